"""Device-side time of one optimizer update (+ apply) on ResNet-50 / GPT-2-small shapes.

Every optimizer runs ``--steps`` steps inside one ``jit`` (``lax.fori_loop``
over ``update`` and ``optax.apply_updates``), timed after a warm-up. The
gradient is a fixed random tree carried through the loop behind
``lax.optimization_barrier``, so no work on it can be hoisted out of the loop.
All optimizers are compiled first, then timed in interleaved rounds (each
round calls each once), so load changes on a shared machine hit them alike.
Ratios are against ``optax.sgd`` and against the matching optax base, measured
in the same run, from the medians (``vs_*``) and from the minima (``*_min``).
``roof_%`` is the time a minimal number of passes over the params would take
at the copy bandwidth (a read-plus-write pass over a params-sized float32
array, timed in the same interleaved rounds) as a percentage of the measured
time: 3 arrays for SGD, 5 for Layca-SGD's two passes (read w, g; read w, g,
write w). The ablation rows patch the library while tracing, to show what
the whole-tree safety switch costs and what taking ``<w,w>`` as known would
save; neither ablation is offered by the library.

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
from layca_jax import _numerics as nx

RATE = 3.0 ** -3
COPY = 'copy pass (bandwidth roof)'


@contextlib.contextmanager
def patched(module, **values) -> Iterator[None]:
  """Sets attributes of ``module`` while Layca is traced (ablation rows)."""
  originals = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in originals.items():
      setattr(module, name, value)


def careful_branch_always(params):
  """Every step takes the careful branch: the fallback's cost."""
  del params
  return patched(_closed_form,
                 use_fast=lambda sums, is_exact: jnp.array(False))


def fast_branch_always(params):
  """Ablation: no whole-tree switch at all (valid only for these inputs):
  what the safety switch costs."""
  del params
  return patched(_closed_form, use_fast=lambda sums, is_exact: jnp.array(True))


def norm_taken_as_known(params):
  """Ablation, not offered by the library: ``<w,w>`` taken as ``n0^2``
  instead of measured (two sums instead of three). Layca keeps every norm
  at ``n0``, but this silently goes wrong when something else changes the
  params between steps; this row measures what it would save."""
  specs = lx.layer_specs(params)
  known = {spec.path: nx.unit_sum(nx.upcast(w) ** 2, spec, None)
           for spec, w in zip(specs, jax.tree.leaves(params))
           if spec is not None}

  def two_sums(spec, w, d, axis_name):
    w32, d32 = nx.upcast(w), nx.upcast(d)
    return _closed_form.TangentSums(
        known[spec.path], nx.unit_sum(d32 * w32, spec, axis_name),
        nx.unit_sum(d32 * d32, spec, axis_name))

  recipe = _closed_form.LAYCA_UPDATE._replace(sums=two_sums)
  return patched(_closed_form, LAYCA_UPDATE=recipe)


# name -> (make transformation, matching optax base name or None, min passes,
#          patch of the library while tracing, for the ablation rows)
OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation],
                            str | None, int | None, Callable | None]] = {
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
    'lx.layca_sgd (careful path)': (lambda: lx.layca_sgd(RATE), 'optax.sgd', 5,
                                    careful_branch_always),
    'lx.layca_sgd (ablation: no switch)': (
        lambda: lx.layca_sgd(RATE), 'optax.sgd', 5, fast_branch_always),
    'lx.layca_sgd (ablation: <w,w> known)': (
        lambda: lx.layca_sgd(RATE), 'optax.sgd', 5, norm_taken_as_known),
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
  make, _, _, *patch = OPTIMIZERS[name]
  tx = make()
  state = tx.init(params)
  run = update_loop(tx, steps)
  with patch[0](params) if patch else contextlib.nullcontext():
    jax.block_until_ready(run(params, state, grads))  # Traces under the patch.
  return lambda: run(params, state, grads)


def bench_model(model: str, divisor: int, steps: int, repeats: int,
                names: list[str]) -> list[dict]:
  shapes = common.MODELS[model](divisor)
  params = common.random_tree(shapes, seed=0, scale=0.05)
  grads = common.random_tree(shapes, seed=1, scale=1e-3)
  param_bytes = common.tree_bytes(params)
  loops = {COPY: common.copy_loop(param_bytes, steps)}
  for name in names:
    loops[name] = compiled_loop(name, params, grads, steps)
    print(f'  compiled {model} {name}', flush=True)
  times = common.time_interleaved(loops, repeats)
  bandwidth = common.copy_bandwidth(times.pop(COPY), param_bytes, steps)
  rows = [{'model': model, 'optimizer': name,
           **common.per_step(times[name], steps)} for name in names]
  by_name = {r['optimizer']: r for r in rows}
  for r in rows:
    _, base, passes, *_ = OPTIMIZERS[r['optimizer']]
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
  common.report('bench_update', rows,
                ['model', 'optimizer', 'ms', 'min_ms', 'vs_sgd', 'vs_sgd_min',
                 'vs_base', 'vs_base_min', 'roof_%'],
                'Update step, device-side', args, info, steps=steps,
                repeats=repeats)


if __name__ == '__main__':
  main()
