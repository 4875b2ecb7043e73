"""Every example script and the Colab notebook, run for real in --quick mode.

Each script runs in a subprocess with a temporary output folder; the tests
read its JSON and PNG outputs and check the properties the script states:
rotations are cosine distances in [0, 2] starting at 0, Layca holds every
layer's norm, larger rates rotate further, the quickstart's printed summary
is the one its numbers give, a study resumed from its checkpoints ends
bit-identical to an uninterrupted one, and the notebook trains data-parallel
over 8 (virtual CPU) devices.

The subprocesses share a persistent XLA compilation cache, so programs
compiled by one script are not compiled again by the next.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / 'examples'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LAYERS = ['Conv_0/kernel', 'Conv_1/kernel', 'Conv_2/kernel', 'Dense_0/kernel']


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp('jax_cache')


def run_python(args: list[str], cache: Path, timeout: int = 600,
               **env: str) -> subprocess.CompletedProcess:
  environ = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'MPLBACKEND': 'Agg',
             'JAX_COMPILATION_CACHE_DIR': str(cache),
             'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5', **env}
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, (
      f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result


def run_script(name: str, out: Path, cache: Path, *flags: str
               ) -> subprocess.CompletedProcess:
  return run_python([str(EXAMPLES / name), '--out', str(out), '--quiet',
                     *flags], cache)


def check_png(path: Path) -> None:
  assert path.read_bytes()[:8] == PNG_MAGIC, f'{path} is not a PNG'
  assert path.stat().st_size > 5000, f'{path} looks empty'


def check_curves(run: dict, epochs: int) -> None:
  """Rotation curves: from 0 at init to the end of training, in [0, 2]."""
  x = np.asarray(run['curve_epochs'])
  assert x[0] == 0 and np.all(np.diff(x) > 0) and x[-1] == epochs
  for path, curve in run['curves'].items():
    curve = np.asarray(curve)
    assert curve.shape == x.shape, path
    assert curve[0] == 0.0, f'{path}: rotation at initialisation must be 0'
    assert np.all((curve >= 0) & (curve <= 2)), path
    assert run['final_rotation'][path] == curve[-1]


def check_run(run: dict) -> None:
  """What holds for every study run: accuracies, losses, curves."""
  assert 0.0 <= run['test_acc'] <= 1.0
  assert all(np.isfinite(run['train_loss_per_epoch']))
  check_curves(run, len(run['test_acc_per_epoch']))


def load(path: Path) -> dict:
  result = json.loads(path.read_text())
  for run in result['runs']:
    check_run(run)
  assert all(isinstance(v, bool) for v in result.get('checks', {}).values())
  return result


def norms_held(run: dict, tol: float = 1e-3) -> bool:
  return all(abs(r - 1) < tol for r in run['norm_ratio'].values())


def comparable(run: dict) -> dict:
  return {k: v for k, v in run.items() if k != 'seconds'}


# ---------------------------------------------------------------------------
# Quickstart.


def test_quickstart(tmp_path, jax_cache):
  printed = run_script('quickstart.py', tmp_path, jax_cache, '--quick').stdout
  result = json.loads((tmp_path / 'quickstart.json').read_text())
  check_png(tmp_path / 'layer_rotation_curves.png')
  assert result['epochs'] == 2
  runs = result['runs']
  untuned, tuned, layca = runs.values()
  assert list(runs) == ['SGD, lr 3^-3 (untuned)', 'SGD, lr 3^-1 (tuned)',
                        'Layca-SGD, rate 3^-2']
  for run in runs.values():
    assert list(run['curves']) == LAYERS  # forward order
    assert 0.0 <= run['test_acc'] <= 1.0
    check_curves(run, 2)
  assert norms_held(layca) and not norms_held(tuned)
  # The larger SGD rate turns every layer further; Layca (rate 3^-2 on
  # every layer) turns each one further than the untuned SGD turns any.
  assert all(tuned['final_rotation'][k] > untuned['final_rotation'][k]
             for k in LAYERS)
  assert min(layca['final_rotation'].values()) > max(
      untuned['final_rotation'].values())
  # One rotation table per run, then a summary whose numbers are the run's.
  assert printed.count('cosine distance  angle (deg)') == 3
  for name, run in runs.items():
    row = re.search(re.escape(name) + r' +([\d. %]+)\n', printed).group(1)
    *rotation, mean, accuracy = row.split()
    assert [float(v) for v in rotation] == pytest.approx(
        list(run['final_rotation'].values()), abs=5e-4)
    assert float(mean) == pytest.approx(
        np.mean(list(run['final_rotation'].values())), abs=5e-4)
    assert accuracy == f"{run['test_acc']:.1%}"
  for a, b in [(tuned, untuned), (layca, tuned)]:
    gap = f"{100 * (a['test_acc'] - b['test_acc']):+.1f} points"
    further = sum(a['final_rotation'][k] > b['final_rotation'][k]
                  for k in LAYERS)
    assert f'{gap} of test accuracy' in printed
    assert f'{further} of 4 layers turned further' in printed


# ---------------------------------------------------------------------------
# The studies.


def test_study_layca_rates_and_resume(tmp_path, jax_cache):
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  run_script('study_layca_rates.py', whole, jax_cache, '--quick')
  result = load(whole / 'layca_rates.json')
  check_png(whole / 'layca_rates_curves.png')
  check_png(whole / 'layca_rates_accuracy.png')
  assert [r['rate'] for r in result['runs']] == [3.0 ** -1, 3.0 ** -4]
  assert all(norms_held(r) for r in result['runs'])
  fast, slow = result['runs']
  # Every layer of the faster run turned further than every layer of the slower.
  assert min(fast['final_rotation'].values()) > max(
      slow['final_rotation'].values())
  assert result['checks']['the final layer rotation grows with the Layca rate']

  # Interrupted after 1 of 2 epochs, then resumed from the orbax checkpoints:
  # params (SHA-256), curves, losses and accuracies as in the whole run.
  checkpoints = resumed / 'checkpoints'
  saved = lambda: {d.name: sorted(p.name for p in d.iterdir())
                   for d in checkpoints.iterdir()}
  interrupt = ('--quick', '--checkpoints', '--stop-after', '1')
  run_script('study_layca_rates.py', resumed, jax_cache, *interrupt)
  partial = load(resumed / 'layca_rates.json')
  assert [len(r['test_acc_per_epoch']) for r in partial['runs']] == [1, 1]
  assert saved() == {'Layca-SGD_3_-1': ['1'], 'Layca-SGD_3_-4': ['1']}
  printed = run_script('study_layca_rates.py', resumed, jax_cache, '--quick',
                       '--resume').stdout
  for name in ('Layca-SGD 3^-1', 'Layca-SGD 3^-4'):
    assert f'{name}: resumed from the checkpoint of epoch 1' in printed
  again = load(resumed / 'layca_rates.json')
  assert [comparable(r) for r in again['runs']] == [
      comparable(r) for r in result['runs']]
  assert set(map(tuple, saved().values())) == {('1', '2')}
  # Without --resume a run starts afresh: the epoch-2 checkpoints go.
  run_script('study_layca_rates.py', resumed, jax_cache, *interrupt)
  assert [comparable(r) for r in load(resumed / 'layca_rates.json')['runs']
          ] == [comparable(r) for r in partial['runs']]
  assert set(map(tuple, saved().values())) == {('1',)}


def test_study_sgd_lr(tmp_path, jax_cache):
  run_script('study_sgd_lr.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'sgd_lr.json')
  check_png(tmp_path / 'sgd_lr_curves.png')
  check_png(tmp_path / 'sgd_lr_accuracy.png')
  high, low = result['runs']
  assert high['learning_rate'] > low['learning_rate']
  assert high['mean_final_rotation'] > low['mean_final_rotation']
  assert not norms_held(high)  # plain SGD does not hold the norm


def test_study_alpha(tmp_path, jax_cache):
  run_script('study_alpha.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'alpha.json')
  check_png(tmp_path / 'alpha_curves.png')
  check_png(tmp_path / 'alpha_accuracy.png')
  uniform, skewed = result['runs']
  assert set(uniform['multipliers'].values()) == {1.0}
  m = list(skewed['multipliers'].values())  # forward order
  assert m == sorted(m) and m[-1] == 1.0 and m[0] < 1e-3
  assert all(norms_held(r) for r in result['runs'])
  first, last = result['order'][0], result['order'][-1]
  assert skewed['final_rotation'][first] < skewed['final_rotation'][last]


def test_study_weight_decay(tmp_path, jax_cache):
  run_script('study_weight_decay.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'weight_decay.json')
  check_png(tmp_path / 'weight_decay_curves.png')
  without, with_decay = result['runs']
  assert (without['weight_decay'], with_decay['weight_decay']) == (0.0, 5e-3)
  # Same seed and batches: weight decay shrinks every kernel relative to
  # the run without it.
  for path in without['norm_ratio']:
    assert with_decay['norm_ratio'][path] < without['norm_ratio'][path]


def test_study_warmup(tmp_path, jax_cache):
  run_script('study_warmup.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'warmup.json')
  check_png(tmp_path / 'warmup_curves.png')
  without, with_warmup = result['runs']
  assert without['warmup_steps'] == 0 < with_warmup['warmup_steps']
  assert result['checks'][
      'without warm-up the layers rotate further during the warm-up period']


def test_study_adaptive(tmp_path, jax_cache):
  run_script('study_adaptive.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'adaptive.json')
  check_png(tmp_path / 'adaptive_curves.png')
  alone, with_l2, with_layca = result['runs']
  assert [r['layca'] for r in result['runs']] == [False, False, True]
  assert norms_held(with_layca) and not norms_held(alone)
  assert with_layca['mean_final_rotation'] > max(
      alone['mean_final_rotation'], with_l2['mean_final_rotation'])


def test_study_mlp_features(tmp_path, jax_cache):
  run_script('study_mlp_features.py', tmp_path, jax_cache, '--quick')
  result = load(tmp_path / 'mlp_features.json')
  check_png(tmp_path / 'mlp_features.png')
  check_png(tmp_path / 'mlp_features_curves.png')
  assert len(result['units']) == 5 and len(set(result['units'])) == 5
  low, high = result['runs']
  assert all(norms_held(r) for r in result['runs'])
  # A unit that no input activates gets no gradient and stays put at any
  # rate; the others turn further at the higher rate.
  assert np.all(np.asarray(result['unit_rotation'][high['name']]) >=
                np.asarray(result['unit_rotation'][low['name']]))
  median = result['median_unit_rotation']
  assert median[high['name']] > median[low['name']]
  assert result['same_unit_move_cosine'] > result['other_unit_move_cosine']


# ---------------------------------------------------------------------------
# The Colab notebook.


def test_notebook_runs_data_parallel_on_8_cpu_devices(tmp_path, jax_cache):
  notebook = nbformat.read(EXAMPLES / 'colab_tpu.ipynb', as_version=4)
  code = [c.source for c in notebook.cells if c.cell_type == 'code']
  assert code[0].startswith('# colab-only') and 'pip install' in code[0]
  runnable = [c for c in code if not c.startswith('# colab-only')]
  assert not any(line.lstrip().startswith(('%', '!'))
                 for c in runnable for line in c.splitlines())
  script = tmp_path / 'notebook.py'
  script.write_text('\n\n'.join(runnable) + '\n')
  printed = run_python(
      [str(script)], jax_cache,
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
      LAYCA_NOTEBOOK_EPOCHS='1').stdout
  assert '8 devices (cpu)' in printed
  assert 'over 8 devices' in printed
  assert 'epoch  1' in printed
  assert 'Conv_0/kernel' in printed and 'cosine distance' in printed
