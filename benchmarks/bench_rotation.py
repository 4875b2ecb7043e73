"""Device-side time of measuring layer rotation, against reading params and init once.

``lx.layer_rotation(params, init_params)`` (and ``lx.track_rotation``'s update
when the package has it) run ``--steps`` times inside one ``jit``, against a
baseline that reads both trees once (a jitted sum of every leaf of both).
The trees are carried through the loop behind ``lax.optimization_barrier`` so
that nothing is hoisted out of it.

    python benchmarks/bench_rotation.py            # scaled-down shapes on CPU
    python benchmarks/bench_rotation.py --full
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import _common as common
import layca_jax as lx


def loop(measure: Callable, steps: int):
  """Runs ``measure(params, init)`` ``steps`` times; sums its results."""

  @jax.jit
  def run(params, init):
    def body(_, carry):
      p, p0, acc = carry
      p, p0 = jax.lax.optimization_barrier((p, p0))
      values = [jnp.sum(v) for v in jax.tree.leaves(measure(p, p0))]
      return p, p0, acc + sum(values)
    return jax.lax.fori_loop(0, steps, body,
                             (params, init, jnp.zeros([], jnp.float32)))[2]

  return run


def read_once(params, init):
  return [jnp.sum(x) + jnp.sum(y)
          for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(init))]


def track_rotation_measure():
  """``track_rotation``'s update as a measure (None if the package lacks it)."""
  if not hasattr(lx, 'track_rotation'):
    return None
  tx = lx.track_rotation()

  def measure(params, init):
    state = tx.init(init)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    return lx.tracked_rotation(state)

  return measure


def main() -> None:
  args = common.shapes_parser(__doc__.splitlines()[0]).parse_args()
  divisor, steps, repeats = common.run_size(args, cpu_repeats=7)
  measures = {'read params + init once': read_once,
              'lx.layer_rotation': lx.layer_rotation}
  tracked = track_rotation_measure()
  if tracked is not None:
    measures['lx.track_rotation update'] = tracked
  rows = []
  for model in args.models:
    shapes = common.MODELS[model](divisor)
    init = common.random_tree(shapes, seed=0, scale=0.05)
    params = common.random_tree(shapes, seed=1, scale=0.05)
    fns = {}
    for name, measure in measures.items():
      run = loop(measure, steps)
      fns[name] = (lambda run=run: run(params, init))
    times = common.time_interleaved(fns, repeats)
    rows += common.ratio_rows(times, steps, 'read params + init once',
                              'measure', 'vs_read_once', model=model,
                              leaves=len(shapes), params=common.tree_size(params),
                              width_divisor=divisor)
  common.report('bench_rotation', rows,
                ['model', 'measure', 'ms', 'min_ms', 'vs_read_once',
                 'vs_read_once_min'], 'Layer rotation, device-side', args,
                steps=steps, repeats=repeats)


if __name__ == '__main__':
  main()
