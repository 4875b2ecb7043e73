"""Device-side time of one optimizer update (+ apply) on ResNet-50 / GPT-2-small shapes.

Every optimizer runs ``--steps`` steps inside one ``jit`` (``lax.fori_loop``
over ``update`` and ``optax.apply_updates``), timed after a warm-up. The
gradient is a fixed random tree carried through the loop behind
``lax.optimization_barrier``, so no work on it can be hoisted out of the loop.
All optimizers are compiled first, then timed in interleaved rounds (each
round calls each once), so load changes on a shared machine hit them alike.
Ratios are against ``optax.sgd`` and against the matching optax base, measured
in the same run, from the medians (``vs_*``) and from the minima (``*_min``). ``roof_%`` is the time a minimal number of passes over the
params would take at the copy bandwidth measured in the same run (bytes
read + written / bandwidth) as a percentage of the measured time: 3 arrays
for SGD, 5 for Layca-SGD's two passes (read w, g; read w, g, write w).

    python benchmarks/bench_update.py            # scaled-down shapes on CPU
    python benchmarks/bench_update.py --full     # full ResNet-50 / GPT-2-small
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import optax

import _common as common
import layca_jax as lx
from layca_jax import _closed_form

RATE = 3.0 ** -3


@contextlib.contextmanager
def careful_path_only() -> Iterator[None]:
  """Traces Layca with the closed form disabled (every step takes the
  careful branch), to time the fallback."""
  original = _closed_form.use_fast
  _closed_form.use_fast = lambda sums, is_exact: jnp.array(False)
  try:
    yield
  finally:
    _closed_form.use_fast = original


# name -> (make transformation, matching optax base name or None, min passes)
OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation],
                            str | None, int | None]] = {
    'optax.sgd': (lambda: optax.sgd(0.1), None, 3),
    'optax.sgd(momentum=0.9)': (lambda: optax.sgd(0.1, momentum=0.9), None, 5),
    'optax.adam': (lambda: optax.adam(1e-3), None, 7),
    'optax.rmsprop': (lambda: optax.rmsprop(1e-3), None, None),
    'optax.adagrad': (lambda: optax.adagrad(1e-2), None, None),
    'optax.lars': (lambda: optax.lars(0.1), None, None),
    'chain(layca, sgd, keep_norm)': (
        lambda: optax.chain(lx.layca(), optax.sgd(RATE), lx.keep_norm()),
        'optax.sgd', 5),
    'lx.layca_sgd': (lambda: lx.layca_sgd(RATE), 'optax.sgd', 5),
    'lx.layca_sgd (careful path)': (lambda: lx.layca_sgd(RATE), 'optax.sgd', 5),
    'lx.layca_sgd(momentum=0.9)': (lambda: lx.layca_sgd(RATE, momentum=0.9),
                                   'optax.sgd(momentum=0.9)', None),
    'lx.layca_adam': (lambda: lx.layca_adam(3.0 ** -5), 'optax.adam', None),
    'lx.layca_rmsprop': (lambda: lx.layca_rmsprop(3.0 ** -5), 'optax.rmsprop',
                         None),
    'lx.layca_adagrad': (lambda: lx.layca_adagrad(3.0 ** -5), 'optax.adagrad',
                         None),
}


def update_loop(tx: optax.GradientTransformation, steps: int):
  """A jitted function running ``steps`` updates of ``tx`` from (params, state)."""

  @jax.jit
  def run(params, state, grads):
    def body(_, carry):
      p, s, g = carry
      # An opaque no-op: XLA cannot tell that g is the same every step, so
      # nothing computed from it alone is hoisted out of the loop, and g is
      # read from memory each step, as a fresh gradient would be.
      g = jax.lax.optimization_barrier(g)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, g
    return jax.lax.fori_loop(0, steps, body, (params, state, grads))

  return run


def compiled_loop(name: str, params, grads, steps: int):
  """A zero-argument function running ``steps`` steps of optimizer ``name``."""
  make, _, _ = OPTIMIZERS[name]
  tx = make()
  state = tx.init(params)
  run = update_loop(tx, steps)
  guard = careful_path_only() if 'careful' in name else contextlib.nullcontext()
  with guard:
    jax.block_until_ready(run(params, state, grads))  # Traces under the guard.
  return lambda: run(params, state, grads)


def bench_model(model: str, divisor: int, steps: int, repeats: int,
                names: list[str]) -> list[dict]:
  shapes = common.MODELS[model](divisor)
  params = common.random_tree(shapes, seed=0, scale=0.05)
  grads = common.random_tree(shapes, seed=1, scale=1e-3)
  param_bytes = common.tree_bytes(params)
  bandwidth = common.copy_bandwidth(param_bytes, steps, repeats)
  loops = {}
  for name in names:
    loops[name] = compiled_loop(name, params, grads, steps)
    print(f'  compiled {model} {name}', flush=True)
  times = common.time_interleaved(loops, repeats)
  rows = [{'model': model, 'optimizer': name,
           **common.per_step(times[name], steps)} for name in names]
  by_name = {r['optimizer']: r for r in rows}
  for r in rows:
    _, base, passes = OPTIMIZERS[r['optimizer']]
    for key, ref in (('vs_sgd', 'optax.sgd'), ('vs_base', base)):
      if ref in by_name:
        r[key] = r['ms'] / by_name[ref]['ms']
        r[key + '_min'] = r['min_ms'] / by_name[ref]['min_ms']
    r['roof_%'] = (100 * passes * param_bytes / bandwidth / (r['ms'] * 1e-3)
                   if passes else None)
    r.update(leaves=len(shapes), params=common.tree_size(params),
             width_divisor=divisor, copy_GBps=bandwidth / 1e9)
  return rows


def main() -> None:
  parser = common.shapes_parser(__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='+', default=None,
                      help='optimizer names to run (optax.sgd is always run)')
  args = parser.parse_args()
  divisor, steps, repeats = common.run_size(args)
  names = list(OPTIMIZERS)
  if args.only:
    names = ['optax.sgd'] + [n for n in args.only if n != 'optax.sgd']
  info = common.device_info()
  print(f'{info["device"]} ({info["platform"]}), width/{divisor}, '
        f'{steps} steps per call, median of {repeats}')
  rows = []
  for model in args.models:
    rows += bench_model(model, divisor, steps, repeats, names)
  common.print_table(
      rows, ['model', 'optimizer', 'ms', 'min_ms', 'vs_sgd', 'vs_sgd_min',
             'vs_base', 'vs_base_min', 'roof_%'],
      title=f'Update step, device-side ({info["device"]})')
  common.write_json(args.json or common.default_json_path('bench_update'),
                    {'benchmark': 'bench_update', 'info': info,
                     'steps': steps, 'repeats': repeats, 'rows': rows})


if __name__ == '__main__':
  main()
