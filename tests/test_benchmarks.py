"""The benchmark scripts run and write what their README tables come from.

Tiny shapes, one step, one timed call: this checks the plumbing (the rows,
the ratios, the library patches of the ablation rows, the branch recording
of the deviceless TPU compile, the warm-state census), not the speed.
"""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layca_jax as lx

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--models', 'smoke', '--steps', '1', '--repeats', '1']
NO_LIBTPU = ("libtpu is not installed (the opt-in extra: pip install -e "
             "'.[tpu]'), so nothing can be compiled for TPU here")


def run_benchmark(name: str, out: Path, *flags: str,
                  tiny: tuple[str, ...] = tuple(TINY)) -> dict:
  path = out / f'{name}.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / f'{name}.py'), *tiny, *flags,
       '--json', str(path)],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  assert '| ' in result.stdout  # The markdown table.
  return json.loads(path.read_text())


def test_bench_update_rows_and_ratios(tmp_path):
  names = ['chain(layca, sgd, keep_norm)', 'lx.layca_sgd',
           'lx.layca_sgd (careful path)', 'lx.layca_sgd (ablation: no switch)',
           'lx.layca_sgd (ablation: lax.cond switch)']
  result = run_benchmark('bench_update', tmp_path, '--warm-train', '0',
                         '--only', *names)
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'optax.sgd', *names}
  assert rows['optax.sgd']['vs_sgd'] == 1.0
  # An ablation that does not apply here says so in its row: the lax.cond
  # switch is already the library's on XLA:CPU (it differs on XLA:GPU).
  skipped = {name for name, r in rows.items() if 'skipped' in r}
  assert skipped == {'lx.layca_sgd (ablation: lax.cond switch)'}
  assert 'already' in rows['lx.layca_sgd (ablation: lax.cond switch)']['skipped']
  for name, r in rows.items():
    if name not in skipped:
      assert r['ms'] > 0 and math.isfinite(r['vs_sgd']) and r['copy_GBps'] > 0
  assert result['warm_rows'] == []


def test_profile_update_counts_the_kernels_that_ran(tmp_path):
  result = run_benchmark('profile_update', tmp_path, tiny=(
      '--models', 'smoke', '--steps', '2'))
  rows = {r['optimizer']: r for r in result['rows']}
  sgd, layca = rows['optax.sgd'], rows['lx.layca_sgd']
  assert sgd['kernels'] >= 1 and sgd['kernel_ms'] > 0 and sgd['wall_ms'] > 0
  assert sgd['conditionals'] == 0
  # XLA:CPU keeps Layca's conditionals (the sums' form; the switch to the
  # refined branch, in which one per layer leaf of the smoke model's two and
  # the switch to the careful branch) and runs one branch of each: fewer
  # kernels ran than the program holds.
  assert layca['conditionals'] == 1 + 1 + 2 + 1 and layca['whiles'] == 0
  assert 0 < layca['kernels'] < layca['fusions']
  assert 'already' in rows['lx.layca_sgd (ablation: lax.cond switch)']['skipped']
  # Tracking's conditional is kept: recording steps are a branch.
  tracked = rows['optax.sgd + lx.track_rotation(every=4)']
  assert tracked['conditionals'] >= 1 and tracked['kernels'] < tracked['fusions']


def test_lax_cond_ablation_is_the_gated_switch_made_a_conditional(
    benchmarks, bench_tpu_aot, monkeypatch):
  """Traced for XLA:GPU, the library gates the careful branch with a loop;
  the ablation row traces the same update with a ``lax.cond`` instead."""
  bench_update = benchmarks('bench_update')
  from layca_jax import _closed_form
  monkeypatch.setattr(_closed_form, 'compiling_for', lambda: 'gpu')
  params = {'k': jnp.ones((4, 3))}
  tx = lx.layca_sgd(0.1)

  def primitives():
    jaxpr = jax.make_jaxpr(lambda p: tx.update(p, tx.init(p), p))(params)
    return bench_tpu_aot.primitive_names(jaxpr.jaxpr)

  assert 'while' in primitives() and 'cond' not in primitives()
  with bench_update.conditional_switch(params):
    assert 'cond' in primitives() and 'while' not in primitives()


def test_bench_update_warm_rows(tmp_path):
  layca = 'lx.layca_sgd'
  result = run_benchmark(
      'bench_update', tmp_path, '--models', '--warm-train', '40',
      '--warm-width', '16', '--warm-steps', '2', '--warm-optimizers', layca,
      '--warm-units', 'neuron')
  rows = {(r['optimizer'], r.get('units', ''), r['state']): r
          for r in result['warm_rows']}
  bases = ['optax.sgd']
  units = ['per neuron']
  assert set(rows) == {(name, u, state) for state in ('fresh', 'warm')
                       for name, u in [(b, '') for b in bases]
                       + [(layca, u) for u in units]}
  for (name, u, state), r in rows.items():
    assert r['ms'] > 0
    assert r['vs_sgd'] == pytest.approx(r['ms'] / rows['optax.sgd', '', state]['ms'])
    if state == 'warm':
      fresh = rows[name, u, 'fresh']
      assert r['warm_vs_fresh'] == pytest.approx(r['ms'] / fresh['ms'])
    if name == layca:
      # 4 dense kernels, one unit per output: 16 + 16 + 16 + 10.
      assert r['unit_count'] == 58
      assert 0 <= r['dead'] + r['parallel'] <= r['unit_count']
      assert r['branch'] in ('fast', 'refined', 'careful')
      assert r['branch_jit'] in ('fast', 'refined', 'careful')
      assert r['vs_base'] == r['vs_sgd']
      if state == 'warm':  # It trained for real.
        assert r['loss_end'] < 0.8 * r['loss_start']
      else:  # Random gradients: every unit has a step, well conditioned.
        assert r['dead'] == 0 and r['parallel'] == 0 and r['branch'] == 'fast'
        assert r['sums'] in ('raw', 'one form')


@pytest.fixture
def benchmarks(monkeypatch):
  """Imports a module of benchmarks/ in this process."""
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  return importlib.import_module


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
def test_census_counts_dead_and_parallel_units(benchmarks, platform,
                                               monkeypatch):
  """In each platform's layout (XLA:GPU's switch is a loop, not a
  conditional), the census sees the units and the switch's choice."""
  bench_update = benchmarks('bench_update')
  from layca_jax import _closed_form
  monkeypatch.setattr(_closed_form, 'compiling_for', lambda: platform)
  rng = np.random.default_rng(0)
  params = {'Dense_0': {'kernel': rng.normal(size=(8, 5)), 'bias': np.zeros(5)},
            'Dense_1': {'kernel': rng.normal(size=(5, 3)), 'bias': np.zeros(3)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = jax.tree.map(lambda x: np.array(rng.normal(size=x.shape), np.float32),
                       params)
  grads['Dense_0']['kernel'][:, 0] = 0.0  # A dead unit.
  w = np.asarray(params['Dense_1']['kernel'])
  grads['Dense_1']['kernel'][:, 2] = -3.0 * w[:, 2]  # Parallel: cos^2 = 1.
  # cos^2 = 0.9 > 7/8: nearly parallel; and 0.8, not.
  for column, cos2 in ((0, 0.9), (1, 0.8)):
    a = w[:, column] / np.linalg.norm(w[:, column])
    b = rng.normal(size=5)
    b -= (b @ a) * a
    b /= np.linalg.norm(b)
    grads['Dense_1']['kernel'][:, column] = np.sqrt(cos2) * a + np.sqrt(1 - cos2) * b
  tx = lx.layca_sgd(0.1, per_neuron=True)
  census = bench_update.census(tx, params, tx.init(params), grads)
  assert census['unit_count'] == 8
  assert census['dead'] == 1 and census['parallel'] == 2
  assert census['branch'] == 'fast'
  # Two units to centre: XLA:CPU's layout reads the weights as they are,
  # and scales and centres the steps.
  assert census['sums'] == ('raw weights' if platform == 'cpu' else 'one form')
  # One entry 2^70 outside its unit's sample: the refined branch; weights
  # pruned to zero after init: the careful one.
  w = {'kernel': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
  g = {'kernel': rng.normal(size=(16, 8)).astype(np.float32)}
  unsampled = set(range(16 * 8)) - set(_closed_form._sample_positions(16 * 8))
  g['kernel'].flat[min(unsampled)] = 2.0 ** 70
  tx = lx.layca_sgd(0.1)
  g = jax.tree.map(jnp.asarray, g)
  assert bench_update.census(tx, w, tx.init(w), g)['branch'] == 'refined'
  pruned = jax.tree.map(jnp.zeros_like, w)
  assert bench_update.census(tx, pruned, tx.init(w), g)['branch'] == 'careful'


# A compiled XLA:TPU program's shape, by hand: w (HBM) is read by a sample
# gather and a fusion; g is sliced into on-chip memory (S(1)) in two halves;
# the sum and the update read the on-chip copy; the update is written on
# chip and copied out to HBM.
_TPU_HLO = """HloModule step

%gathered (p: f32[64,128]) -> f32[8] {
  %p = f32[64,128]{1,0} parameter(0)
  %i = s32[8,2]{1,0} constant({...})
  ROOT %gather = f32[8]{0} gather(%p, %i), offset_dims={}
}

%summed (a: f32[64,128], b: f32[64,128]) -> f32[] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = f32[64,128]{1,0} parameter(1)
  %m = f32[64,128]{1,0} multiply(%a, %b)
  ROOT %r = f32[] reduce(%m, %z), dimensions={0,1}, to_apply=%add
}

%updated (a: f32[64,128], b: f32[64,128], c: f32[]) -> f32[64,128] {
  ROOT %s = f32[64,128]{1,0} subtract(%a, %b)
}

ENTRY %main.1 (w: f32[64,128], g: f32[64,128]) -> f32[64,128] {
  %w = f32[64,128]{1,0:T(8,128)} parameter(0)
  %g = f32[64,128]{1,0:T(8,128)} parameter(1)
  %sample = f32[8]{0:T(128)S(1)} fusion(%w), kind=kLoop, calls=%gathered
  %s0 = ((f32[64,128]{1,0:T(8,128)}), f32[32,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%g), slice={[0:32], [0:128]}
  %s1 = ((f32[64,128]{1,0:T(8,128)}), f32[32,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%g), slice={[32:64], [0:128]}
  %d0 = f32[32,128]{1,0:T(8,128)S(1)} slice-done(%s0)
  %d1 = f32[32,128]{1,0:T(8,128)S(1)} slice-done(%s1)
  %gv = f32[64,128]{1,0:T(8,128)S(1)} custom-call(%d0, %d1), custom_call_target="ConcatBitcast"
  %sums = f32[]{:T(128)} fusion(%w, %gv), kind=kLoop, calls=%summed
  %new = f32[64,128]{1,0:T(8,128)S(1)} fusion(%w, %gv, %sums), kind=kLoop, calls=%updated
  %out = (f32[64,128]{1,0:T(8,128)}, f32[64,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%new)
  ROOT %done = f32[64,128]{1,0:T(8,128)} copy-done(%out)
}
"""


@pytest.fixture
def bench_tpu_aot(benchmarks, monkeypatch):
  """bench_tpu_aot.py, imported without leaving its libtpu settings in the
  environment of later tests."""
  for name in ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE',
               'ALLOW_MULTIPLE_LIBTPU_LOAD'):
    monkeypatch.setenv(name, os.environ.get(name, ''))
  return benchmarks('bench_tpu_aot')


def test_hbm_traffic_counts_what_crosses_hbm(bench_tpu_aot):
  array = 64 * 128 * 4
  # The 8 entries gathered, g once (both halves), w twice, the update once,
  # the sum (in HBM) written and read; nothing for what the fusions read or
  # write on chip.
  assert bench_tpu_aot.hbm_traffic(_TPU_HLO) == (
      8 * 4 + array + 2 * array + array + 2 * 4)
  with pytest.raises(ValueError, match='path taken'):
    bench_tpu_aot.hbm_traffic(_TPU_HLO.replace(
        'kind=kLoop, calls=%updated', 'kind=kLoop, calls=%updated\n'
        '  %c = f32[] conditional(%p, %sums, %sums)'))


def test_path_text_writes_a_run_of_switches_once(bench_tpu_aot, benchmarks):
  common = benchmarks('_common')
  leaf = common.Branch('_closed_form.switch', 'cond', 1)
  careful = common.Branch('_closed_form.switch', 'cond', 0)
  track = common.Branch('_tracking.update_fn', 'cond', 0)
  assert bench_tpu_aot.path_text([leaf] * 3 + [careful, leaf, track]) == (
      '3 x _closed_form.switch:true '
      '_closed_form.switch:false '
      '_closed_form.switch:true _tracking.update_fn:false')
  assert bench_tpu_aot.path_text([]) == '(no conditional)'


def test_taken_branches_stage_only_the_recorded_path(benchmarks):
  common = benchmarks('_common')

  def new_step():  # A new function each time: jax caches traces per function.
    def step(p, x):
      return jax.lax.cond(
          p > 0, lambda x: 2.0 * x,
          lambda x: jax.lax.switch(1, [jnp.sin, lambda x: x + 1], x), x)
    return step

  x = jnp.arange(3.0)
  for p, branches, expected in ((1.0, ['test_benchmarks.step:true'], 2 * x),
                                (-1.0, ['test_benchmarks.step:false',
                                        'test_benchmarks.<lambda>:1'], x + 1)):
    taken = []
    with common.taken_branches(taken, record=True):
      new_step()(jnp.float32(p), x)
    assert [str(b) for b in taken] == branches
    with common.taken_branches(taken, record=False):
      jaxpr = jax.make_jaxpr(new_step())(jnp.float32(-p), x)  # Other sign.
    with common.taken_branches(taken, record=False):
      out = jax.jit(new_step())(jnp.float32(-p), x)
    assert not {'cond', 'switch'} & {e.primitive.name for e in jaxpr.eqns}
    np.testing.assert_array_equal(out, expected)
  with pytest.raises(RuntimeError, match='not the recorded'):
    with common.taken_branches([common.Branch('elsewhere.f', 'cond', 1)],
                               record=False):
      jax.make_jaxpr(new_step())(jnp.float32(1.0), x)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason=NO_LIBTPU)
def test_bench_tpu_aot_whole_program_and_path_taken(tmp_path):
  track = 'chain(sgd, track_rotation(every=2)), {} step'
  names = ['lx.layca_sgd', 'lx.layca_sgd (careful path)',
           'lx.layca_sgd (ablation: no switch)',
           'floor: two-pass closed form',
           track.format('recorded'), track.format('other')]
  result = run_benchmark('bench_tpu_aot', tmp_path, '--every', '2', '--only',
                         *names, tiny=('--models', 'smoke'))
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'optax.sgd', *names}
  # XLA counts a cond as its dearest branch plus its operands again; the
  # path taken of cond(p, x * 2, x * 2) is x * 2 alone.
  toy = result['toy']
  assert toy['cond_path_passes'] == toy['plain_passes'] < toy['cond_whole_passes']
  # What crosses HBM: optax.sgd reads g and w and writes w (three passes).
  assert rows['optax.sgd']['hbm_x_params'] == pytest.approx(3.0, rel=1e-3)
  for name, r in rows.items():
    assert r['path_bytes'] > 0 and r['path_fusions'] > 0
    assert r['hbm_x_params'] > 2.99 and r['path_hbm'] < r['path_bytes']
    assert r['path_vs_sgd'] == pytest.approx(
        r['path_bytes'] / rows['optax.sgd']['path_bytes'])
    if r['path'] == '(no conditional)':
      assert r['whole_bytes'] == r['path_bytes']
    else:
      assert r['whole_bytes'] >= r['path_bytes']
  for name in names[-2:]:  # Base optax.sgd: extra bytes in params read.
    assert rows[name]['extra_x_params'] == pytest.approx(
        (rows[name]['path_bytes'] - rows['optax.sgd']['path_bytes'])
        / rows[name]['param_bytes'])
  fast, careful = rows['lx.layca_sgd'], rows['lx.layca_sgd (careful path)']
  assert fast['path'].endswith(':true') and careful['path'].endswith(':false')
  assert fast['whole_bytes'] > fast['path_bytes']
  assert careful['path_bytes'] > fast['path_bytes']
  # The fast branch alone, traced by the library or by the replay: the same
  # program, up to where XLA places its copies.
  assert rows['lx.layca_sgd (ablation: no switch)']['whole_bytes'] == (
      pytest.approx(fast['path_bytes'], rel=0.02))
  recorded, other = rows[track.format('recorded')], rows[track.format('other')]
  assert recorded['path'].startswith('_tracking.update_fn:true')
  assert other['path'] == '_tracking.update_fn:false'
  assert recorded['path_bytes'] > other['path_bytes']


@pytest.mark.parametrize('name', ['bench_rotation', 'bench_sum_forms'])
def test_other_device_side_benchmarks_write_their_rows(tmp_path, name):
  rows = run_benchmark(name, tmp_path)['rows']
  assert len(rows) >= 3
  assert all(r['ms'] > 0 for r in rows)
