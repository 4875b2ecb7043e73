"""The benchmark scripts run and write what their README tables come from.

Tiny shapes, one step, one timed call: this checks the plumbing (the rows,
the ratios, the library patches of the ablation rows), not the speed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--models', 'smoke', '--steps', '1', '--repeats', '1']


def run_benchmark(name: str, out: Path, *flags: str) -> dict:
  path = out / f'{name}.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / f'{name}.py'), *TINY, *flags,
       '--json', str(path)],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  assert '| ' in result.stdout  # The markdown table.
  return json.loads(path.read_text())


def test_bench_update_rows_and_ratios(tmp_path):
  names = ['chain(layca, sgd, keep_norm)', 'lx.layca_sgd',
           'lx.layca_sgd (careful path)', 'lx.layca_sgd (ablation: no switch)',
           'lx.layca_sgd (ablation: <w,w> known)']
  result = run_benchmark('bench_update', tmp_path, '--only', *names)
  rows = {r['optimizer']: r for r in result['rows']}
  assert set(rows) == {'optax.sgd', *names}
  assert rows['optax.sgd']['vs_sgd'] == 1.0
  for r in rows.values():
    assert r['ms'] > 0 and math.isfinite(r['vs_sgd']) and r['copy_GBps'] > 0


@pytest.mark.parametrize('name', ['bench_rotation', 'bench_sum_forms'])
def test_other_device_side_benchmarks_write_their_rows(tmp_path, name):
  rows = run_benchmark(name, tmp_path)['rows']
  assert len(rows) >= 3
  assert all(r['ms'] > 0 for r in rows)
