"""Does a data-dependent ``lax.cond`` cost a device-to-host synchronisation?

Layca's update ends in a whole-tree ``lax.cond`` (fast branch or careful
branch) whose predicate is computed on the device. Some XLA backends run a
conditional by copying the predicate to the host and waiting for it, which
stalls the launch of everything after it. Two signals, each against the same
program without the conditional (the branch it takes, alone):

* per-step time in a ``lax.fori_loop`` of tiny steps (latency-bound: a host
  round trip per step shows as microseconds a step);
* dispatch time: how long the call takes to *return* (before
  ``block_until_ready``) when each step does real work. If the host waits for
  the predicate, the call returns only when (nearly) all the work is done.

And the library's own switch: ``lx.layca_sgd``'s update on small MLP shapes
(latency-bound) against the same update with the switch patched out
(valid for these well-conditioned inputs only) and with the careful branch
forced, and which branch the jitted update takes on this device
(``branch_jit``). ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` (CUDA
graphs off) tells whether graph capture is what a conditional breaks.

    python benchmarks/bench_cond_sync.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

import _common as common
import bench_update
import layca_jax as lx


def toy_loop(size: int, steps: int, use_cond: bool):
  """``steps`` steps of ``x <- x * 1.0001`` behind a predicate computed on
  the device (always true). The branch not taken sorts ``x``: a branch that
  dear keeps XLA from turning the conditional into a select of both, as it
  may for cheap branches, so the conditional stays a real one."""

  @jax.jit
  def run(x):
    def body(_, x):
      pred = jnp.sum(x) > -1e30  # Always true, but only the device knows.
      up, dear = (lambda v: v * 1.0001), (lambda v: jnp.sort(v) * 0.9999)
      if use_cond:
        return jax.lax.cond(pred, up, dear, x)
      return up(x)  # What the conditional computes, without it.
    return jax.lax.fori_loop(0, steps, body, x)

  return run


def dispatch_seconds(run, x, repeats: int) -> tuple[float, float]:
  """Median seconds for the call to return, and for its result to be ready."""
  jax.block_until_ready(run(x))
  returned, ready = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    out = run(x)
    returned.append(time.perf_counter() - start)
    jax.block_until_ready(out)
    ready.append(time.perf_counter() - start)
  return statistics.median(returned), statistics.median(ready)


def main() -> None:
  parser = common.json_parser(__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args()
  cpu = common.on_cpu()
  steps = args.steps or (200 if cpu else 2000)
  repeats = args.repeats or (5 if cpu else 10)
  rows = []

  tiny = jnp.ones((256,), jnp.float32)
  loops = {form: toy_loop(tiny.size, steps, form == 'lax.cond')
           for form in ('no conditional', 'lax.cond')}
  times = common.time_interleaved(
      {k: (lambda f=f: f(tiny)) for k, f in loops.items()}, repeats)
  rows += common.ratio_rows(times, steps, 'no conditional', 'program',
                            'vs_without', signal='tiny steps', size=tiny.size)

  big = jnp.ones((1 << 24,), jnp.float32)  # 64 MiB: ~0.1 ms a step on HBM.
  big_steps = max(1, steps // 10)
  for form in ('no conditional', 'lax.cond'):
    run = toy_loop(big.size, big_steps, form == 'lax.cond')
    returned, ready = dispatch_seconds(run, big, repeats)
    rows.append({'signal': 'dispatch', 'program': form, 'size': big.size,
                 'returned_ms': 1e3 * returned, 'ready_ms': 1e3 * ready,
                 'returned_fraction': returned / ready})

  shapes = {f'Dense_{i}/kernel': (a, b) for i, (a, b) in
            enumerate([(64, 128), (128, 128), (128, 128), (128, 10)])}
  params, grads = bench_update.random_inputs(shapes)
  fns = {'lx.layca_sgd': bench_update.compiled_loop(
             lx.layca_sgd(bench_update.RATE), params, grads, steps),
         'lx.layca_sgd (careful path)': bench_update.compiled_loop(
             lx.layca_sgd(bench_update.RATE), params, grads, steps,
             patch=bench_update.careful_branch_always),
         'lx.layca_sgd (no switch)': bench_update.compiled_loop(
             lx.layca_sgd(bench_update.RATE), params, grads, steps,
             patch=bench_update.fast_branch_always)}
  times = common.time_interleaved(fns, repeats)
  tx = lx.layca_sgd(bench_update.RATE)
  branch = bench_update.jitted_branch(tx, params, tx.init(params), grads)
  rows += common.ratio_rows(times, steps, 'lx.layca_sgd (no switch)',
                            'program', 'vs_without', signal='Layca MLP update',
                            branch_jit=branch)

  common.report('bench_cond_sync', rows,
                ['signal', 'program', 'ms', 'min_ms', 'vs_without',
                 'returned_ms', 'ready_ms', 'returned_fraction', 'branch_jit'],
                'Data-dependent lax.cond: per-step cost and dispatch', args,
                steps=steps, repeats=repeats)


if __name__ == '__main__':
  main()
