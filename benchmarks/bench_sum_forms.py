"""Ways to write the closed-form Layca-SGD step in plain jnp, timed against SGD.

Why ``lx.layca_sgd`` costs what it costs on a given backend: each row is the
same per-leaf closed form (``w <- w/|w| - r t/|t|`` up to scale, no safety
switch, no state) with the three per-unit sums ``<w,w>, <d,w>, <d,d>`` written
another way. Rows are timed device-side in interleaved rounds, as in
``bench_update.py``. On XLA:CPU none of the single-pass forms beat three plain
sums; only dropping ``<w,w>`` (``known <w,w>``, which the library does not
do: it trusts nothing about the params between steps) saves a pass. The
``per unit`` rows sum per output unit (``per_neuron=True``); the last three
form the sums as the library's fast branch does for units it scales and
centres (per-unit powers of two, a centre, the exact product), the last
with the weights read as they are (what XLA:CPU is given).

    python benchmarks/bench_sum_forms.py            # GPT-2-small/4 on CPU
    python benchmarks/bench_sum_forms.py --full
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import _common as common
from layca_jax import _closed_form
from layca_jax import _numerics as nx

Sums = tuple[jax.Array, jax.Array, jax.Array]


def three_sums(w, d) -> Sums:
  return jnp.sum(w * w), jnp.sum(d * w), jnp.sum(d * d)


def dots(w, d) -> Sums:
  wf, df = w.ravel(), d.ravel()
  return jnp.dot(wf, wf), jnp.dot(df, wf), jnp.dot(df, df)


def variadic(w, d) -> Sums:
  return jax.lax.reduce((w * w, d * w, d * d), (0.0, 0.0, 0.0),
                        lambda a, b: tuple(x + y for x, y in zip(a, b)),
                        tuple(range(w.ndim)))


def stacked(w, d) -> Sums:
  s = jnp.sum(jnp.stack([w * w, d * w, d * d]).reshape(3, -1), axis=1)
  return s[0], s[1], s[2]


def row_then_total(w, d) -> Sums:
  total = lambda x: jnp.sum(jnp.sum(x, axis=-1))
  return total(w * w), total(d * w), total(d * d)


def complex_packed(w, d) -> Sums:
  """``sum((w + i d)^2) = <w,w> - <d,d> + 2i <d,w>``: two sums read (w, d)."""
  z = jax.lax.complex(w, d)
  s = jnp.sum(z * z)
  dd = jnp.sum(d * d)
  return jnp.real(s) + dd, 0.5 * jnp.imag(s), dd


def known_ww(w, d) -> Sums:
  """``<w,w>`` not measured (taken as 1 here; params are unit-norm)."""
  return jnp.ones((), w.dtype), jnp.sum(d * w), jnp.sum(d * d)


def _unit_sum(x: jax.Array) -> jax.Array:
  """Per output unit (the last axis), as ``per_neuron=True`` sums a kernel."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)), keepdims=True)


def per_unit_sums(w, d) -> Sums:
  return _unit_sum(w * w), _unit_sum(d * w), _unit_sum(d * d)


def _first(x: jax.Array) -> jax.Array:
  """Each unit's first entry."""
  return x[(slice(0, 1),) * (x.ndim - 1)]


def _centre(w_hat, d_hat):
  """A centre read from each unit's first entries (a run-time value, as its
  sample's)."""
  w0, d0 = _first(w_hat), _first(d_hat)
  return jnp.where(w0 != 0, d0 / jnp.where(w0 != 0, w0, 1.0), 0.0)


def _scaled(w, d):
  """``w_hat``, ``d_hat - c w_hat`` as the library's fast branch forms them
  when a unit is scaled and centred: per-unit powers of two and a centre,
  here read from each unit's first entries."""
  w_hat = w * nx.pow2(-nx.frexp_exponent(_first(w)), w.dtype)
  d_hat = d * nx.pow2(-nx.frexp_exponent(_first(d)), d.dtype)
  return w_hat, _closed_form.minus_product(d_hat, _centre(w_hat, d_hat), w_hat)


def per_unit_scaled_centred(w, d) -> Sums:
  w_hat, e = _scaled(w, d)
  return _unit_sum(w_hat * w_hat), _unit_sum(e * w_hat), _unit_sum(e * e)


def per_unit_scaled_centred_apart(w, d) -> Sums:
  """The same sums, each formed from its own copy of the inputs (an
  ``optimization_barrier`` per copy, so that XLA does not merge them): no
  elementwise value is read by two reductions."""
  copy = lambda k: jax.lax.optimization_barrier((jnp.int32(k), w, d))[1:]
  (w1, _), (w2, e2), (_, e3) = (_scaled(*copy(k)) for k in range(3))
  return _unit_sum(w1 * w1), _unit_sum(e2 * w2), _unit_sum(e3 * e3)


def per_unit_weights_as_they_are(w, d) -> Sums:
  """The same sums with the weights read as they are and only the step
  scaled and centred (``_closed_form.raw_weights_tangent_sums``: what the
  library reads on XLA:CPU when units need centring)."""
  w_unscale = nx.pow2(-nx.frexp_exponent(_first(w)), w.dtype)
  d_hat = d * nx.pow2(-nx.frexp_exponent(_first(d)), d.dtype)
  centre = _centre(w * w_unscale, d_hat)
  e = _closed_form.minus_product(d_hat, centre * w_unscale, w)
  return _unit_sum(w * w), _unit_sum(e * w), _unit_sum(e * e)


FORMS: dict[str, Callable[[jax.Array, jax.Array], Sums]] = {
    'three jnp.sum': three_sums,
    'three jnp.dot': dots,
    'one variadic lax.reduce': variadic,
    'one stacked (3, n) sum': stacked,
    'two-stage (rows, then total)': row_then_total,
    'complex packing': complex_packed,
    'known <w,w> (two sums)': known_ww,
    'per unit: three jnp.sum': per_unit_sums,
    'per unit: scaled and centred': per_unit_scaled_centred,
    'per unit: scaled and centred, each sum its own copy':
        per_unit_scaled_centred_apart,
    'per unit: weights as they are, step scaled and centred':
        per_unit_weights_as_they_are,
}
RATE = 0.1


def layca_step(sums_of: Callable) -> Callable:
  def step(w, d):
    ww, dw, dd = sums_of(w, d)
    c = dw / ww
    alpha = jax.lax.rsqrt(ww)
    beta = -RATE * jax.lax.rsqrt(dd - c * dw)
    return w + (alpha - 1.0) * w + beta * (d - c * w)
  return step


def sgd_step(w, d):
  return w - RATE * d


def tree_loop(step: Callable, steps: int):
  @jax.jit
  def run(params, grads):
    def body(_, carry):
      p, g = carry
      g = jax.lax.optimization_barrier(g)
      return [step(w, d) for w, d in zip(p, g)], g
    return jax.lax.fori_loop(0, steps, body, (params, grads))
  return run


def main() -> None:
  parser = common.shapes_parser(__doc__.splitlines()[0])
  parser.set_defaults(models=['gpt2_small'])
  args = parser.parse_args()
  divisor, steps, repeats = common.run_size(args, cpu_repeats=11)
  rows = []
  for model in args.models:
    shapes = common.MODELS[model](divisor)
    # Unit-norm leaves: every form computes the same step, and known_ww is
    # right to take <w,w> = 1 on every step.
    params = [w / jnp.linalg.norm(w) for w in jax.tree.leaves(
        common.random_tree(shapes, seed=0))]
    grads = jax.tree.leaves(common.random_tree(shapes, seed=1, scale=1e-3))
    steps_by_name = {'optax-style SGD step': sgd_step}
    steps_by_name.update({name: layca_step(f) for name, f in FORMS.items()})
    fns = {}
    for name, step in steps_by_name.items():
      run = tree_loop(step, steps)
      fns[name] = lambda run=run: run(params, grads)
    times = common.time_interleaved(fns, repeats)
    rows += common.ratio_rows(times, steps, 'optax-style SGD step', 'form',
                              'vs_sgd', model=model,
                              params=common.tree_size(params),
                              width_divisor=divisor)
  common.report('bench_sum_forms', rows,
                ['model', 'form', 'ms', 'min_ms', 'vs_sgd', 'vs_sgd_min'],
                'Closed-form Layca step, sum forms', args, steps=steps,
                repeats=repeats)


if __name__ == '__main__':
  main()
