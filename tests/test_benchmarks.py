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
           'lx.layca_sgd (careful path)', 'lx.layca_sgd (ablation: no switch)']
  result = run_benchmark('bench_update', tmp_path, '--warm-train', '0',
                         '--only', *names)
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'optax.sgd', *names}
  assert rows['optax.sgd']['vs_sgd'] == 1.0
  # An ablation whose patch no longer fits the library says so in its row.
  skipped = {name for name, r in rows.items() if 'skipped' in r}
  assert not skipped
  for name, r in rows.items():
    if name not in skipped:
      assert r['ms'] > 0 and math.isfinite(r['vs_sgd']) and r['copy_GBps'] > 0
  assert result['warm_rows'] == []


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
      assert r['branch'] in ('fast', 'careful')
      assert r['branch_jit'] in ('fast', 'careful')
      assert r['vs_base'] == r['vs_sgd']
      if state == 'warm':  # It trained for real.
        assert r['loss_end'] < 0.8 * r['loss_start']
      else:  # Random gradients: every unit has a step, well conditioned.
        assert r['dead'] == 0 and r['parallel'] == 0 and r['branch'] == 'fast'


@pytest.fixture
def benchmarks(monkeypatch):
  """Imports a module of benchmarks/ in this process."""
  monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
  return importlib.import_module


def test_census_counts_dead_and_parallel_units(benchmarks):
  bench_update = benchmarks('bench_update')
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
  assert census['branch'] in ('fast', 'careful')


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
           'floor: two-pass closed form (this script)',
           track.format('recorded'), track.format('other')]
  result = run_benchmark('bench_tpu_aot', tmp_path, '--every', '2', '--only',
                         *names, tiny=('--models', 'smoke'))
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'optax.sgd', *names}
  # XLA counts a cond as its dearest branch plus its operands again; the
  # path taken of cond(p, x * 2, x * 2) is x * 2 alone.
  toy = result['toy']
  assert toy['cond_path_passes'] == toy['plain_passes'] < toy['cond_whole_passes']
  for name, r in rows.items():
    assert r['path_bytes'] > 0 and r['path_fusions'] > 0
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
