"""Layca across 2 processes (jax.distributed on loopback, gloo CPU collectives)
gives the single-process answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / 'multiprocess_worker.py'
TIMEOUT_S = 150


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch_two_processes(out_path: Path) -> list[str]:
  """Runs both workers; returns their logs. Always reaps them."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  port = free_port()
  logs = [out_path.with_suffix(f'.{i}.log') for i in range(2)]
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), str(i), str(port), str(out_path)],
          stdout=logs[i].open('w'), stderr=subprocess.STDOUT, env=env,
          cwd=str(HERE.parent)))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [log.read_text() for log in logs]
  codes = [p.returncode for p in procs]
  assert codes == [0, 0], (
      f'workers exited with {codes} (negative: killed after {TIMEOUT_S}s). '
      f'Logs:\n' + '\n---\n'.join(t[-3000:] for t in texts))
  return texts


def test_two_processes_match_one(tmp_path):
  sys.path.insert(0, str(HERE))
  try:
    import multiprocess_worker
  finally:
    sys.path.remove(str(HERE))
  out_path = tmp_path / 'distributed.npz'
  logs = launch_two_processes(out_path)
  # Both ranks joined over gloo (its own log line).
  assert all('[Gloo] Rank' in log for log in logs), logs
  expected = multiprocess_worker.run_single()
  with np.load(out_path) as got:
    assert sorted(got.files) == sorted(expected)
    for key, value in expected.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  # The run did something: every layer turned, by less than 90 degrees.
  rotations = [v for k, v in expected.items() if '/rotation/' in k]
  assert rotations and all(0 < float(r) < 1 for r in rotations)
