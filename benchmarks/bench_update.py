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
the whole-tree safety switch costs; it is not offered by the library.

Warm states (a second table): random gradients are the easy case, every
unit well conditioned. Each Layca optimizer (SGD, SGD with momentum 0.9,
Adam; per layer and per neuron) first trains a 3-hidden-layer ReLU MLP on
scikit-learn's digits (batch 64, ``--warm-train`` steps); the update at its
params, state and the next batch's gradient is then timed beside the same
optimizer at a fresh state (initial params and state, random gradients of the
same shapes) and optax.sgd and the matching optax base at both. These rows
time fixed inputs: every step of the loop starts from the same params and
state (behind the same barrier as the gradient), since repeating one
gradient for many steps would walk away from the state measured. Each Layca
row also says what the update meets there, from one eager update: units with
a zero base direction (dead ReLU units), units whose direction is nearly
parallel to the weights (``cos^2 > 7/8``, stale momentum), and which branch
the whole-tree switch took.

    python benchmarks/bench_update.py            # scaled-down shapes on CPU
    python benchmarks/bench_update.py --full     # full ResNet-50 / GPT-2-small
    python benchmarks/bench_update.py --models --warm-train 840   # warm only
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


class AblationUnavailable(Exception):
  """A row's library patch does not fit the installed library's internals."""


def careful_branch_always(params):
  """Every step takes the careful branch: the fallback's cost."""
  del params
  return patched(_closed_form, use_fast=lambda *_, **__: jnp.array(False))


def fast_branch_always(params):
  """Ablation: no whole-tree switch at all (valid only for these inputs):
  what the safety switch costs."""
  del params
  return patched(_closed_form, use_fast=lambda *_, **__: jnp.array(True))


def conditional_switch(params):
  """Ablation: the switch as a plain ``lax.cond`` where the library gates the
  careful branch with a loop instead (XLA:GPU runs both branches of that
  conditional): what the gate saves. Elsewhere the switch is that
  conditional already, and the row is skipped."""
  del params
  if not _closed_form.conditionals_run_both_branches():
    raise AblationUnavailable('the switch is a lax.cond on this platform '
                              'already (the lx.layca_sgd row)')
  return patched(_closed_form, conditionals_run_both_branches=lambda: False)


def floor_layca_sgd(rate: float) -> optax.GradientTransformation:
  """Layca-SGD per layer (leaves of rank >= 2; others frozen) in its plainest
  closed form: three sums per leaf, then ``update = (a + b c - 1) w - b g``.
  No range checks, no fallback, no state but the initial norms: a reference
  for the passes, not an optimizer to use."""

  def update(grads, norms, params):
    def one(g, w, n0):
      if w.ndim < 2:
        return jnp.zeros_like(w)
      ww, gw, gg = jnp.sum(w * w), jnp.sum(g * w), jnp.sum(g * g)
      c = gw / ww
      k = n0 / jnp.sqrt(1.0 + rate * rate)
      a, b = k * jax.lax.rsqrt(ww), rate * k * jax.lax.rsqrt(gg - c * gw)
      return (a + b * c - 1.0) * w - b * g
    return jax.tree.map(one, grads, params, norms), norms

  return optax.GradientTransformation(
      lambda params: jax.tree.map(lambda w: jnp.sqrt(jnp.sum(w * w)), params),
      update)


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
    'floor: two-pass closed form': (lambda: floor_layca_sgd(RATE), 'optax.sgd',
                                    5),
    'lx.layca_sgd (careful path)': (lambda: lx.layca_sgd(RATE), 'optax.sgd', 5,
                                    careful_branch_always),
    'lx.layca_sgd (ablation: no switch)': (
        lambda: lx.layca_sgd(RATE), 'optax.sgd', 5, fast_branch_always),
    'lx.layca_sgd (ablation: lax.cond switch)': (
        lambda: lx.layca_sgd(RATE), 'optax.sgd', 5, conditional_switch),
    'lx.layca_sgd(momentum=0.9)': (lambda: lx.layca_sgd(RATE, momentum=0.9),
                                   'optax.sgd(momentum=0.9)', None),
    'lx.layca_adam': (lambda: lx.layca_adam(3.0 ** -5), 'optax.adam', None),
    'lx.layca_rmsprop': (lambda: lx.layca_rmsprop(3.0 ** -5), 'optax.rmsprop',
                         None),
    'lx.layca_adagrad': (lambda: lx.layca_adagrad(3.0 ** -5), 'optax.adagrad',
                         None),
}


def apply_step(tx: optax.GradientTransformation, params, state, grads):
  """One step: ``tx.update`` then ``optax.apply_updates``; (params, state)."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def update_loop(tx: optax.GradientTransformation, steps: int,
                fixed: bool = False):
  """A jitted function running ``steps`` updates of ``tx`` from (params, state).

  With ``fixed``, every step starts from the given (params, state) instead
  of the previous step's result (both pass the same barrier as the
  gradient), so that the time is that of the state given, not of where
  ``steps`` steps on one fixed gradient lead.
  """

  @jax.jit
  def run(params, state, grads):
    def body(_, carry):
      # An opaque no-op: XLA cannot tell that g is the same every step, so
      # nothing computed from it alone is hoisted out of the loop, and g is
      # read from memory each step, as a fresh gradient would be.
      if fixed:
        p, s, g = jax.lax.optimization_barrier(carry[:3])
        return (p, s, g, *apply_step(tx, p, s, g))
      p, s, g = carry
      g = jax.lax.optimization_barrier(g)
      return (*apply_step(tx, p, s, g), g)
    carry = (params, state, grads) + ((params, state) if fixed else ())
    return jax.lax.fori_loop(0, steps, body, carry)

  return run


def lowered_loop(tx: optax.GradientTransformation, params, grads, steps: int,
                 state=None, patch: Callable | None = None,
                 fixed: bool = False) -> tuple[Any, tuple]:
  """``update_loop(tx, steps, fixed)`` traced and lowered (under
  ``patch(params)`` when given) from ``(params, state)`` (``tx.init(params)``
  by default), and its arguments."""
  state = tx.init(params) if state is None else state
  run = update_loop(tx, steps, fixed)
  with patch(params) if patch else contextlib.nullcontext():
    return run.trace(params, state, grads).lower(), (params, state, grads)


def compile_all(lowered: dict[Any, tuple[Any, tuple]]
                ) -> dict[Any, Callable[[], Any]]:
  """Compiles every ``lowered_loop`` of ``lowered`` on parallel threads (XLA
  releases the GIL while it compiles; ResNet-50 rows take ~20 s each on a
  GPU host) and returns zero-argument functions running them, run once."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    compiled = dict(zip(lowered, pool.map(lambda item: item[0].compile(),
                                          lowered.values())))
  runs = {key: functools.partial(compiled[key], *args)
          for key, (_, args) in lowered.items()}
  for run in runs.values():
    jax.block_until_ready(run())
  return runs


def compiled_loop(tx: optax.GradientTransformation, params, grads, steps: int,
                  state=None, patch: Callable | None = None,
                  fixed: bool = False) -> Callable[[], Any]:
  """A zero-argument function running ``lowered_loop(...)``, compiled and
  run once."""
  return compile_all({0: lowered_loop(tx, params, grads, steps, state, patch,
                                      fixed)})[0]


def random_inputs(shapes: dict[str, tuple[int, ...]]):
  """(params, grads): random, well-conditioned (every unit takes the fast
  branch), the inputs of every random-gradient row."""
  return (common.random_tree(shapes, seed=0, scale=0.05),
          common.random_tree(shapes, seed=1, scale=1e-3))


def add_ratios(row: dict, **refs: dict | None) -> None:
  """``row[key]`` (``row[key + '_min']``): the row's median (minimum) time
  over reference row ``refs[key]``'s, for each reference given."""
  for key, ref in refs.items():
    if ref is not None:
      row[key] = row['ms'] / ref['ms']
      row[key + '_min'] = row['min_ms'] / ref['min_ms']


def bench_model(model: str, divisor: int, steps: int, repeats: int,
                names: list[str]) -> list[dict]:
  shapes = common.MODELS[model](divisor)
  params, grads = random_inputs(shapes)
  param_bytes = common.tree_bytes(params)
  lowered, skipped = {}, []
  for name in names:
    make, _, _, *patch = OPTIMIZERS[name]
    try:
      lowered[name] = lowered_loop(make(), params, grads, steps,
                                   patch=patch[0] if patch else None)
    except AblationUnavailable as e:
      print(f'  skipped {model} {name}: {e}', flush=True)
      skipped.append({'model': model, 'optimizer': name, 'skipped': str(e)})
  loops = {COPY: common.copy_loop(param_bytes, steps), **compile_all(lowered)}
  print(f'  compiled {model}: {", ".join(lowered)}', flush=True)
  names = [n for n in names if n in loops]
  times = common.time_interleaved(loops, repeats)
  bandwidth = common.copy_bandwidth(times.pop(COPY), param_bytes, steps)
  rows = [{'model': model, 'optimizer': name,
           **common.per_step(times[name], steps)} for name in names]
  by_name = {r['optimizer']: r for r in rows}
  for r in rows:
    _, base, passes, *_ = OPTIMIZERS[r['optimizer']]
    add_ratios(r, vs_sgd=by_name.get('optax.sgd'), vs_base=by_name.get(base))
    r['roof_%'] = (100 * passes * param_bytes / bandwidth / (r['ms'] * 1e-3)
                   if passes else None)
    r.update(leaves=len(shapes), params=common.tree_size(params),
             width_divisor=divisor, copy_GBps=bandwidth / 1e9)
  return rows + skipped


# ---------------------------------------------------------------------------
# Warm states: params, optimizer state and gradients after real training.

WARM_BATCH = 64
# Whole-tree switch threshold of the library's fast tangent: |t|^2 < <d,d>/8,
# i.e. cos(d, w)^2 > 7/8 ("nearly parallel" below).
PARALLEL_COS2 = 7.0 / 8.0

# name -> (make transformation from per_neuron, matching optax base name)
WARM_OPTIMIZERS: dict[str, tuple[Callable[[bool], optax.GradientTransformation],
                                 str]] = {
    'lx.layca_sgd': (lambda per_neuron: lx.layca_sgd(
        RATE, per_neuron=per_neuron), 'optax.sgd'),
    'lx.layca_sgd(momentum=0.9)': (lambda per_neuron: lx.layca_sgd(
        RATE, momentum=0.9, per_neuron=per_neuron), 'optax.sgd(momentum=0.9)'),
    'lx.layca_adam': (lambda per_neuron: lx.layca_adam(
        3.0 ** -5, per_neuron=per_neuron), 'optax.adam'),
}


def digits() -> tuple[jax.Array, jax.Array]:
  """The 75% of scikit-learn's 8x8 digits the examples train on (1348
  images, pixels in [0, 1]), and their labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(return_X_y=True)
  keep = np.random.default_rng(0).permutation(len(y))[round(0.25 * len(y)):]
  return jnp.asarray(x[keep] / 16.0, jnp.float32), jnp.asarray(y[keep])


def mlp_init(sizes: tuple[int, ...], seed: int = 0) -> dict:
  """Flax-named dense layers (``Dense_i/kernel``, ``Dense_i/bias``), LeCun
  normal kernels and zero biases."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
  return {f'Dense_{i}': {'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a),
                         'bias': jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Cross-entropy of a ReLU MLP (layers ``Dense_0`` ... in order)."""
  layers = [params[f'Dense_{i}'] for i in range(len(params))]
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer['kernel'] + layer['bias'])
  logits = x @ layers[-1]['kernel'] + layers[-1]['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class WarmState(NamedTuple):
  """Where real training left ``tx``: params, optimizer state, the gradient
  of the next batch; the params it started from; the training-set loss
  before and after."""

  params: Any
  state: Any
  grads: Any
  init_params: Any
  loss: tuple[float, float]


def warm_state(tx: optax.GradientTransformation, width: int,
               train_steps: int, seed: int = 0) -> WarmState:
  """Trains a 3-hidden-layer ReLU MLP of ``width`` on the digits with ``tx``
  for ``train_steps`` batches of 64 (reshuffled each epoch, one ``lax.scan``)."""
  x, y = digits()
  params0 = mlp_init((x.shape[1], width, width, width, 10), seed)
  rng = np.random.default_rng(seed)
  per_epoch = len(y) // WARM_BATCH
  batches = np.concatenate([
      rng.permutation(len(y))[:per_epoch * WARM_BATCH].reshape(-1, WARM_BATCH)
      for _ in range(train_steps // per_epoch + 1)])[:train_steps + 1]
  grad = jax.grad(mlp_loss)

  @jax.jit
  def train(params, state, batches, x, y):
    def body(carry, batch):
      params, state = carry
      return apply_step(tx, params, state, grad(params, x[batch], y[batch])), None
    return jax.lax.scan(body, (params, state), batches)[0]

  params, state = train(params0, tx.init(params0), batches[:-1], x, y)
  grads = jax.jit(grad)(params, x[batches[-1]], y[batches[-1]])
  loss = jax.jit(mlp_loss)
  return WarmState(params, state, grads, params0,
                   (float(loss(params0, x, y)), float(loss(params, x, y))))


BRANCH_NAMES = ('fast', 'refined', 'careful')


def branch_name(branches: list) -> str:
  """What the library's switches did, from the branch each took (an index
  into ``BRANCH_NAMES``: ``_closed_form.FAST``, ``REFINED``, ``CAREFUL``)."""
  taken = sorted(set(int(b) for b in branches))
  return (' and '.join(BRANCH_NAMES[b] for b in taken) if taken
          else 'no switch')


def census(tx: optax.GradientTransformation, params, state, grads) -> dict:
  """What Layca meets on one update at this state, run eagerly: its units,
  dead units (a zero step, ``<d,d> = 0``), nearly parallel units
  (``cos(d, w)^2 > 7/8``), and the branch its whole-tree switch took (and,
  on XLA:CPU, which form its sums were read in: raw or raw weights).

  It reads library internals: it wraps ``layca_jax._closed_form.coefficients``
  to see each layer's weights ``w``, base direction ``d`` and spec (its
  units: ``keepdims_shape``), and ``recording_branches`` to see the branch
  each switch took (fast, refined or careful; a conditional on XLA:CPU and
  XLA:TPU, a loop on XLA:GPU); when those are gone or changed it says so in
  the result instead of failing.
  """
  coefficients = getattr(_closed_form, 'coefficients', None)
  if coefficients is None or not hasattr(_closed_form, 'recording_branches'):
    return {'census': 'unavailable: layca_jax._closed_form.coefficients or '
                      '.recording_branches is gone'}
  seen = []

  def spy(*args, **kwargs):
    seen.append(args[1:4])
    return coefficients(*args, **kwargs)

  taken: list[common.Branch] = []
  with patched(_closed_form, coefficients=spy), \
      _closed_form.recording_branches() as switch, \
      common.taken_branches(taken, record=True):
    jax.block_until_ready(tx.update(grads, state, params))
  forms = [form.name for form in getattr(_closed_form.LAYCA_STEP, 'raw', ())]
  read = sorted({b.index for b in taken
                 if b.site == '_closed_form.group_sums'})
  branch = branch_name(switch)
  form = ' and '.join(forms[i] for i in read) if read else 'one form'
  try:
    sums = [unit_sums(spec, np.asarray(w, np.float64), np.asarray(d, np.float64))
            for specs, ws, ds in seen for spec, w, d in zip(specs, ws, ds)
            if spec is not None]
    ww, dw, dd = (np.concatenate(column) for column in zip(*sums))
  except (AttributeError, TypeError, ValueError) as e:
    return {'branch': branch, 'sums': form,
            'census': f'unavailable: coefficients was called with other '
                      f'arguments ({e!r})'}
  dead = dd == 0
  parallel = ~dead & (dw * dw > PARALLEL_COS2 * ww * dd)
  return {'branch': branch, 'sums': form, 'unit_count': int(ww.size),
          'dead': int(dead.sum()), 'parallel': int(parallel.sum())}


def jitted_branch(tx: optax.GradientTransformation, params, state,
                  grads) -> str:
  """The branch the whole-tree switch takes in the *jitted* update on this
  device ('fast', 'refined', 'careful', or 'no switch'): the compiled program's
  rounding (fused multiply-adds, reduction order) can differ from the eager
  one the census runs."""
  if not hasattr(_closed_form, 'recording_branches'):
    return 'unavailable: layca_jax._closed_form.recording_branches is gone'

  def update(params, state, grads):
    with _closed_form.recording_branches() as branches:
      tx.update(grads, state, params)
    return list(branches)

  return branch_name(jax.jit(update)(params, state, grads))


def unit_sums(spec, w: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
  """``<w,w>``, ``<d,w>``, ``<d,d>`` per unit (flat), the units being the
  axes that ``spec.keepdims_shape`` keeps."""
  axes = tuple(i for i, (n, k) in enumerate(zip(w.shape, spec.keepdims_shape))
               if k == 1 and n != 1)
  return tuple(np.ravel(np.sum(a * b, axis=axes))
               for a, b in ((w, w), (d, w), (d, d)))


def bench_warm(names: list[str], width: int, train_steps: int, steps: int,
               repeats: int, per_neuron_options=(False, True)) -> list[dict]:
  """Each Layca optimizer of ``names``, per layer and per neuron, at its
  warm state and at a fresh one (the MLP's initial params, its initial
  optimizer state, random gradients), beside optax.sgd and the matching
  optax bases at both."""
  bases = ['optax.sgd'] + sorted({WARM_OPTIMIZERS[n][1] for n in names}
                                 - {'optax.sgd'})
  loops, rows = {}, {}

  def add(key, tx, run, params, state, grads, **row):
    """Times ``run`` (``update_loop(tx, steps, fixed=True)``, compiled on
    its first call and shared by the states of one optimizer) here."""
    state = tx.init(params) if state is None else state
    jax.block_until_ready(run(params, state, grads))
    loops[key] = lambda: run(params, state, grads)
    if row.get('base'):  # A Layca row: what it meets there.
      row.update(census(tx, params, state, grads),
                 branch_jit=jitted_branch(tx, params, state, grads))
    rows[key] = {**row, 'state': key[-1]}

  fresh = None
  for name in names:
    make, base = WARM_OPTIMIZERS[name]
    for per_neuron in per_neuron_options:
      tx = make(per_neuron)
      warm = warm_state(tx, width, train_steps)
      units = 'per neuron' if per_neuron else 'per layer'
      print(f'  warm state of {name}, {units}: training loss '
            f'{warm.loss[0]:.3f} -> {warm.loss[1]:.3f} in {train_steps} steps',
            flush=True)
      if fresh is None:
        fresh = (warm.init_params, common.random_like(warm.grads, 1, 1e-3))
        for b in bases:
          optax_tx = OPTIMIZERS[b][0]()
          run = update_loop(optax_tx, steps, fixed=True)
          add((b, 'fresh'), optax_tx, run, *fresh[:1], None, fresh[1],
              optimizer=b)
          add((b, 'warm'), optax_tx, run, warm.params, None, warm.grads,
              optimizer=b)
      run = update_loop(tx, steps, fixed=True)
      add((name, units, 'fresh'), tx, run, fresh[0], None, fresh[1],
          optimizer=name, units=units, base=base)
      add((name, units, 'warm'), tx, run, warm.params, warm.state, warm.grads,
          optimizer=name, units=units, base=base, loss_start=warm.loss[0],
          loss_end=warm.loss[1])
  times = common.time_interleaved(loops, repeats)
  for key, row in rows.items():
    row.update(common.per_step(times[key], steps))
  for key, row in rows.items():
    state = key[-1]
    add_ratios(row, vs_sgd=rows[('optax.sgd', state)],
               vs_base=rows.get((row.get('base'), state)),
               warm_vs_fresh=rows[(*key[:-1], 'fresh')]
               if state == 'warm' else None)
    row.update(width=width, train_steps=train_steps)
  return list(rows.values())


COLUMNS = ['model', 'optimizer', 'ms', 'min_ms', 'vs_sgd', 'vs_sgd_min',
           'vs_base', 'vs_base_min', 'roof_%', 'skipped']
WARM_COLUMNS = ['optimizer', 'units', 'state', 'ms', 'min_ms', 'vs_sgd',
                'vs_base', 'warm_vs_fresh', 'warm_vs_fresh_min', 'unit_count',
                'dead', 'parallel', 'branch', 'sums', 'branch_jit']


def main() -> None:
  parser = common.shapes_parser(__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='+', default=None,
                      help='optimizer names to run (optax.sgd is always run)')
  parser.add_argument('--warm-train', type=int, default=840,
                      help='training steps before the warm state (0: no '
                           'warm-state rows)')
  parser.add_argument('--warm-width', type=int, default=128,
                      help="the MLP's hidden width for the warm states")
  parser.add_argument('--warm-steps', type=int, default=None,
                      help='steps per timed call of the warm-state rows '
                           '(default: 200 on CPU, 1000 elsewhere)')
  parser.add_argument('--warm-optimizers', nargs='+',
                      default=list(WARM_OPTIMIZERS), choices=list(WARM_OPTIMIZERS))
  parser.add_argument('--warm-units', nargs='+', default=['layer', 'neuron'],
                      choices=['layer', 'neuron'],
                      help='rotation units of the warm-state rows')
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
    # Each model's rows as soon as they are timed: a time limit that cuts a
    # later model short keeps them in the log.
    common.print_table([r for r in rows if r['model'] == model], COLUMNS,
                       f'{model} ({info["device"]})')
  warm_rows, warm_steps = [], args.warm_steps or (200 if common.on_cpu()
                                                  else 1000)
  if args.warm_train:
    warm_rows = bench_warm(args.warm_optimizers, args.warm_width,
                           args.warm_train, warm_steps, repeats,
                           [u == 'neuron' for u in args.warm_units])
    common.print_table(
        warm_rows, WARM_COLUMNS,
        f'Update step at warm and fresh states, {args.warm_width}-wide MLP on '
        f'the digits, {args.warm_train} training steps, {warm_steps} steps '
        f'per call ({info["device"]})')
  common.report('bench_update', rows, COLUMNS,
                'Update step, device-side', args, info, steps=steps,
                repeats=repeats, warm_rows=warm_rows, warm_steps=warm_steps)


if __name__ == '__main__':
  main()
