"""The rotational-equilibrium and language-model studies, run for real in
--quick mode: the properties their outputs must have.

* ``study_equilibrium.py``: every prediction is ``lx.equilibrium_angle`` of
  the run's recipe, every ratio is measured / predicted, and the first
  hidden layer (scale-invariant, zero-mean inputs) of the AdamW and SGD runs
  turns by the predicted angle to within 25%.
* ``study_lm.py``: every run learns (validation bits per character below a
  uniform guess), rotation curves are cosine distances starting at 0, every
  Layca layer turns each step by exactly ``atan(rate_t)`` of part 1's rate
  schedule, and warm-up lowers AdamW's first per-step angles.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import layca_jax as lx

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def run_study(name: str, out: Path) -> str:
  environ = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'MPLBACKEND': 'Agg'}
  result = subprocess.run(
      [sys.executable, str(ROOT / 'examples' / name), '--quick', '--quiet',
       '--out', str(out)], cwd=ROOT, env=environ, capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return result.stdout


def check_png(path: Path) -> None:
  assert path.read_bytes()[:8] == PNG_MAGIC, f'{path} is not a PNG'
  assert path.stat().st_size > 5000, f'{path} looks empty'


def test_equilibrium_study_quick(tmp_path):
  stdout = run_study('study_equilibrium.py', tmp_path)
  result = json.loads((tmp_path / 'equilibrium.json').read_text())
  check_png(tmp_path / 'equilibrium_angles.png')
  check_png(tmp_path / 'equilibrium_rotation.png')
  assert 'predicted' in stdout and 'measured' in stdout
  assert {run['recipe']['optimizer'] for run in result['runs']} == {
      'adamw', 'sgd', 'lion'}
  first_hidden = result['layers'][0]
  for run in result['runs']:
    recipe = run['recipe']
    predicted = lx.equilibrium_angle(recipe['optimizer'],
                                     recipe['learning_rate'],
                                     recipe['weight_decay'], **recipe['hyper'])
    assert run['predicted_angle'] == pytest.approx(predicted, rel=1e-12)
    for path, layer in run['layers'].items():
      measured = np.asarray(layer['measured_angle_per_seed'])
      assert len(measured) == result['args']['seeds']
      assert np.all(np.isfinite(measured) & (measured > 0)), path
      assert layer['ratio'] == pytest.approx(measured.mean() / predicted)
    for curves in run['rotation_curves'].values():
      for path in result['layers']:
        curve = np.asarray(curves[path])
        assert curve[0] == 0.0 and np.all((curve >= 0) & (curve <= 2)), path
    if recipe['optimizer'] in ('adamw', 'sgd'):
      assert run['layers'][first_hidden]['ratio'] == pytest.approx(1, abs=0.25)
  flagged = {(label, path) for label, path, _ in result['disagreements']}
  assert flagged == {(run['label'], path) for run in result['runs']
                     for path, layer in run['layers'].items()
                     if abs(layer['ratio'] - 1) > result['tolerance']}


def test_lm_study_quick(tmp_path):
  stdout = run_study('study_lm.py', tmp_path)
  result = json.loads((tmp_path / 'lm.json').read_text())
  check_png(tmp_path / 'lm_rotation.png')
  assert 'val bpc' in stdout
  args = result['args']
  uniform_bits = math.log2(result['chars'])
  names = {row['name'] for row in result['table']}
  assert len(names) == 2 * len(args['lrs']) + 2 + len(args['rate_factors'])
  for row in result['table']:
    assert len(row['val_bpc_per_seed']) == args['seeds']
  by_name = {}
  for run in result['runs']:
    by_name.setdefault(run['name'], []).append(run)
    assert run['val_bpc'] < uniform_bits, run['name']   # it learned
    assert run['val_bpc_curve'][0] > run['val_bpc'], run['name']
    for path, curve in run['rotation_curves'].items():
      curve = np.asarray(curve)
      assert curve[0] == 0.0 and np.all((curve >= 0) & (curve <= 2)), path
    if run['config']['family'] == 'layca':
      # Layca turns every layer by atan(rate_t) each step: the measured mean
      # angle of each chunk is the mean of the set angle over its steps.
      for path, angles in run['angle_curves'].items():
        np.testing.assert_allclose(angles, run['set_angle_curve'], rtol=1e-4,
                                   err_msg=f"{run['name']} {path}")
  best = result['tuned_lr']
  assert best in args['lrs']
  assert result['equilibrium_rate'] == pytest.approx(
      lx.equilibrium_rate('adamw', best, args['weight_decay'], b1=0.9))
  for lr in args['lrs']:  # Warm-up: smaller first steps, smaller angles.
    with_warmup, without = (by_name[f"AdamW lr {lr:g}, {w}"]
                            for w in ('warm-up', 'no warm-up'))
    for a, b in zip(with_warmup, without):
      assert (np.mean([c[0] for c in a['angle_curves'].values()])
              < np.mean([c[0] for c in b['angle_curves'].values()]))
