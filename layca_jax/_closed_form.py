"""Layca's steps in closed form per unit: fast sums, a careful fallback, one switch.

Every update made in this package is, per rotation unit with weights ``w``
and an incoming array ``d``, an affine map of the two:

    update = alpha_m1 * w + beta1 * (beta2 * d - gamma * w)

with per-unit coefficients:

* the ``layca`` link (steps 1-2), ``d`` the incoming step:
  ``|w| t / |t|`` with ``t = d - c w``, ``c = <d,w> / <w,w>``;
* the ``keep_norm`` link (step 4), ``d`` the incoming update:
  ``n0 (w + d) / |w + d| - w``;
* the fused optimizers (steps 1-4 at once), ``d`` the base direction:
  ``K (w / |w| - r t / |t|) - w`` with ``K = n0 / sqrt(1 + r^2)``.

The coefficients come from plain float32 per-unit sums, read in one pass,
whenever every unit of the tree is in a range where those sums are exact
enough; otherwise a single ``lax.cond`` over the whole tree computes them the
careful way (sums of values scaled by exact powers of two, the tangent's norm
measured on the projected step, the result measured and put back on its
sphere). Either branch returns only per-unit coefficients, so the elementwise
pass stays outside the ``cond`` and fuses with what consumes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec

# |t|^2 = <d,d> - c <d,w> is trusted only while it keeps at least this
# fraction of <d,d>: rounding in the sums is then amplified by at most 8x.
_MIN_TANGENT_FRACTION = 2.0 ** -3
# A careful coefficient ``b * 2^e`` is applied as ``b1 * (b2 * d)`` with
# ``b2 = 2^-shift``, ``|shift| <= _MAX_SHIFT``: neither factor leaves the
# float32 range when ``w`` and ``d`` are ~2^120 apart.
_MAX_SHIFT = 100


class Coefficients(NamedTuple):
  """Per-unit coefficients of ``alpha_m1 * w + beta1 * (beta2 * d - gamma * w)``.

  ``beta2 * d - gamma * w`` is formed before it is scaled, so that a step
  nearly along the weights loses nothing to cancellation. All shaped
  ``spec.keepdims_shape`` (float32, or wider for wider params). ``moves`` is
  False for units that keep their weights (a zero update); ``finite`` is
  False for units whose ``d`` held a NaN or Inf (counted as skipped);
  ``norm`` is ``|w|`` (NaN where not measured or not finite).
  """

  alpha_m1: jax.Array
  beta1: jax.Array
  beta2: jax.Array
  gamma: jax.Array
  moves: jax.Array
  finite: jax.Array
  norm: jax.Array


def apply_coefficients(coef: Coefficients, w: jax.Array, d: jax.Array,
                       dtype: Any) -> jax.Array:
  """The elementwise pass: the update, zero where the unit does not move."""
  w32, d32 = nx.upcast(w), nx.upcast(d)
  update = coef.alpha_m1 * w32 + coef.beta1 * (coef.beta2 * d32 - coef.gamma * w32)
  return jnp.where(coef.moves, update, 0.0).astype(dtype)


def _split_exponent(value: jax.Array, exponent: jax.Array):
  """``value * 2^exponent`` as ``(beta1, beta2)`` with ``beta2 = 2^-shift``
  a bounded power of two and ``beta1`` carrying the rest."""
  shift = jnp.clip(-exponent, -_MAX_SHIFT, _MAX_SHIFT)
  return (jnp.ldexp(value, exponent + shift),
          jnp.ldexp(jnp.ones_like(value), -shift))


# ---------------------------------------------------------------------------
# Steps 1-2: the tangent step |w| t / |t|.


class TangentSums(NamedTuple):
  """Plain float32 per-unit sums ``<w,w>``, ``<d,w>``, ``<d,d>``."""

  ww: jax.Array
  dw: jax.Array
  dd: jax.Array


def tangent_sums(spec: LayerSpec, w: jax.Array, d: jax.Array,
                 axis_name) -> TangentSums:
  """The three sums of the fast tangent, shaped ``spec.keepdims_shape``.

  Unscaled, in float32 or wider, ``psum``-ed over ``axis_name``. Three plain
  sums rather than one variadic reduction: XLA:GPU fuses sibling reductions
  into one kernel, and on XLA:CPU the variadic form gave no consistent gain
  (``benchmarks/bench_sum_forms.py``).
  """
  w32, d32 = nx.upcast(w), nx.upcast(d)
  return TangentSums(nx.unit_sum(w32 * w32, spec, axis_name),
                     nx.unit_sum(d32 * w32, spec, axis_name),
                     nx.unit_sum(d32 * d32, spec, axis_name))


def tangent_is_exact(sums: TangentSums) -> jax.Array:
  """Per-unit: whether the fast tangent is exact enough here.

  False for non-finite, tiny (possible underflow), huge, or nearly parallel
  (cancellation in ``|t|^2``) units, which take the careful branch.
  """
  ok = nx.in_safe_range(sums.ww) & nx.in_safe_range(sums.dd)
  ww = jnp.where(ok, sums.ww, 1.0)
  tt = sums.dd - (sums.dw / ww) * sums.dw
  return ok & (tt >= _MIN_TANGENT_FRACTION * sums.dd)


class FastTangent(NamedTuple):
  """``|w| t / |t| = ratio * (d - c * w)``, and ``|w|``, from plain sums."""

  ratio: jax.Array
  c: jax.Array
  w_norm: jax.Array


def fast_tangent(sums: TangentSums) -> FastTangent:
  """The tangent step's coefficients (valid where :func:`tangent_is_exact`)."""
  ok = tangent_is_exact(sums)
  ww = jnp.where(ok, sums.ww, 1.0)
  c = sums.dw / ww
  tt = jnp.where(ok, sums.dd - c * sums.dw, 1.0)
  w_norm = jnp.sqrt(ww)
  return FastTangent(w_norm * jax.lax.rsqrt(tt), c, w_norm)


class CarefulTangent(NamedTuple):
  """The tangent step ``ldexp(ratio, exponent) * (beta2 * d - gamma * w)``.

  ``ratio`` is ``|w_hat| / |t_hat|`` on power-of-two scaled values (zero
  where there is no step), ``w_scale`` the exponent of ``w``'s scaling
  (``w = w_hat * 2^w_scale``) and ``ww`` is ``|w_hat|^2``.
  """

  ratio: jax.Array
  exponent: jax.Array
  beta2: jax.Array
  gamma: jax.Array
  ww: jax.Array
  w_scale: jax.Array
  moves: jax.Array
  finite: jax.Array
  norm: jax.Array


def careful_tangent(spec: LayerSpec, w: jax.Array, d: jax.Array,
                    axis_name) -> CarefulTangent:
  """The tangent step for any finite scale, as Algorithm 1 steps 1-2.

  Sums are taken on values scaled by exact powers of two; the tangent's norm
  is measured on the projected step (no cancellation), and a step parallel
  to the weights to rounding is no step (:func:`layca_jax._numerics.has_tangent`).
  A unit whose ``w`` or ``d`` is not finite, or whose ``w`` is zero, does not
  move.
  """
  w_hat, ew, w_finite = nx.normalize_pow2(nx.upcast(w), spec, axis_name)
  d_hat, ed, d_finite = nx.normalize_pow2(nx.upcast(d), spec, axis_name)
  ww = nx.unit_sum(w_hat * w_hat, spec, axis_name)
  moves = w_finite & d_finite & (ww > 0)
  ww = jnp.where(moves, ww, 1.0)
  c = nx.unit_sum(d_hat * w_hat, spec, axis_name) / ww
  tangent = d_hat - c * w_hat
  tt = nx.unit_sum(tangent * tangent, spec, axis_name)
  has_step = nx.has_tangent(tt, nx.unit_sum(d_hat * d_hat, spec, axis_name))
  ratio = jnp.where(has_step, jnp.sqrt(ww) * jax.lax.rsqrt(
      jnp.where(has_step, tt, 1.0)), 0.0)
  # t_hat = d_hat - c w_hat = 2^-ed d - c 2^-ew w
  #       = 2^(shift-ed) (2^-shift d - c 2^(ed-shift-ew) w),
  # and |w| t / |t| = 2^ew |w_hat| t_hat / |t_hat|.
  shift = jnp.clip(ed, -_MAX_SHIFT, _MAX_SHIFT)
  norm = jnp.where(moves, nx.ldexp_exact(jnp.sqrt(ww), ew),
                   jnp.where(w_finite, 0.0, jnp.nan))
  return CarefulTangent(ratio, ew - ed + shift,
                        jnp.ldexp(jnp.ones_like(ww), -shift),
                        jnp.ldexp(c, ed - shift - ew), ww, ew, moves, d_finite,
                        norm)


def _sphere_factor(spec: LayerSpec, x: jax.Array, n0: jax.Array, axis_name):
  """``(factor, exponent, usable)`` with ``|x * ldexp(factor, exponent)| = n0``.

  ``usable`` is False where ``x`` is zero or not finite.
  """
  x_hat, ex, finite = nx.normalize_pow2(x, spec, axis_name)
  xx = nx.unit_sum(x_hat * x_hat, spec, axis_name)
  usable = finite & (xx > 0)
  return n0 * jax.lax.rsqrt(jnp.where(usable, xx, 1.0)), -ex, usable


# ---------------------------------------------------------------------------
# The layca link: steps 1-2, times each unit's multiplier.


def fast_layca_step(sums: TangentSums, multiplier: jax.Array) -> Coefficients:
  tangent = fast_tangent(sums)
  ones = jnp.ones_like(sums.ww, bool)
  return Coefficients(jnp.zeros_like(tangent.c), multiplier * tangent.ratio,
                      jnp.ones_like(tangent.c), tangent.c, ones, ones,
                      tangent.w_norm)


def careful_layca_step(spec: LayerSpec, w: jax.Array, d: jax.Array,
                       multiplier: jax.Array, axis_name) -> Coefficients:
  t = careful_tangent(spec, w, d, axis_name)
  return Coefficients(jnp.zeros_like(t.ratio),
                      jnp.ldexp(multiplier * t.ratio, t.exponent), t.beta2,
                      t.gamma, t.moves, t.finite, t.norm)


# ---------------------------------------------------------------------------
# The keep_norm link: step 4.


class SphereSums(NamedTuple):
  """Plain float32 per-unit sums ``|w + u|^2`` and ``|u|^2``."""

  xx: jax.Array
  uu: jax.Array


def sphere_sums(spec: LayerSpec, w: jax.Array, u: jax.Array,
                axis_name) -> SphereSums:
  w32, u32 = nx.upcast(w), nx.upcast(u)
  x = w32 + u32
  return SphereSums(nx.unit_sum(x * x, spec, axis_name),
                    nx.unit_sum(u32 * u32, spec, axis_name))


def sphere_is_exact(sums: SphereSums) -> jax.Array:
  """Per-unit: ``|w + u|`` in range, ``u`` zero or in range.

  A ``|u|^2`` of exactly zero with ``|w + u|`` in range means every entry of
  ``u`` is zero or below ``2^-75`` of it: below float32 resolution of the
  unit, so treating the unit as not moving loses nothing.
  """
  return nx.in_safe_range(sums.xx) & (nx.in_safe_range(sums.uu) | (sums.uu == 0))


def fast_back_on_sphere(sums: SphereSums, n0: jax.Array) -> Coefficients:
  factor = n0 * jax.lax.rsqrt(jnp.where(sphere_is_exact(sums), sums.xx, 1.0))
  ones = jnp.ones_like(sums.xx, bool)
  return Coefficients(factor - 1.0, factor, jnp.ones_like(factor),
                      jnp.zeros_like(factor), sums.uu > 0, ones,
                      jnp.full_like(factor, jnp.nan))


def careful_back_on_sphere(spec: LayerSpec, w: jax.Array, u: jax.Array,
                           n0: jax.Array, axis_name) -> Coefficients:
  """``n0 (w + u) / |w + u| - w`` as ``-w + beta1 * (beta2 * u + beta2 * w)``.

  A unit whose ``u`` is zero (e.g. a skipped step), or whose ``w + u`` is
  zero or not finite, keeps its weights bit for bit.
  """
  factor, exponent, usable = _sphere_factor(
      spec, nx.upcast(w) + nx.upcast(u), n0, axis_name)
  moves = usable & (nx.unit_max_abs(u, spec, axis_name) > 0) & (n0 > 0)
  beta1, beta2 = _split_exponent(factor, exponent)
  return Coefficients(-jnp.ones_like(factor), beta1, beta2, -beta2, moves,
                      jnp.ones_like(moves), jnp.full_like(factor, jnp.nan))


# ---------------------------------------------------------------------------
# The fused optimizers: steps 1-4 at rate r.


def fast_layca_update(sums: TangentSums, rate: jax.Array,
                      initial_norm: jax.Array) -> Coefficients:
  tangent = fast_tangent(sums)
  alpha = initial_norm / jnp.sqrt(1.0 + rate * rate) / tangent.w_norm
  ones = jnp.ones_like(sums.ww, bool)
  return Coefficients(alpha - 1.0, -rate * alpha * tangent.ratio,
                      jnp.ones_like(alpha), tangent.c, ones, ones,
                      tangent.w_norm)


def careful_layca_update(spec: LayerSpec, w: jax.Array, d: jax.Array,
                         rate: jax.Array, initial_norm: jax.Array,
                         axis_name) -> Coefficients:
  """As :func:`layca_jax.layca` then :func:`layca_jax.keep_norm`.

  ``K / |w|`` is formed on scaled values (``K`` and ``|w|`` are close), and
  the result, measured as the elementwise pass will compute it, is rescaled
  onto the sphere: with the step nearly along the weights, ``alpha * w`` and
  the step nearly cancel and rounding would move it off.
  """
  t = careful_tangent(spec, w, d, axis_name)
  alpha = (jnp.ldexp(initial_norm / jnp.sqrt(1.0 + rate * rate), -t.w_scale)
           * jax.lax.rsqrt(t.ww))
  beta1 = jnp.ldexp(-rate * alpha * t.ratio, t.exponent)
  w32 = nx.upcast(w)
  trial = alpha * w32 + beta1 * (t.beta2 * nx.upcast(d) - t.gamma * w32)
  factor, exponent, usable = _sphere_factor(spec, trial, initial_norm,
                                            axis_name)
  rescale = jnp.where(t.moves & usable, jnp.ldexp(factor, exponent), 1.0)
  # No step (zero or parallel to the weights): keep the weights exactly, as
  # keep_norm does after a zero step in the chain of links.
  return Coefficients(alpha * rescale - 1.0, beta1 * rescale, t.beta2, t.gamma,
                      t.moves & (t.ratio > 0), t.finite, t.norm)


# ---------------------------------------------------------------------------
# The switch.


class UnitLayout:
  """Lays per-unit values (``keepdims_shape`` per leaf) end to end, and back.

  The per-unit arithmetic then runs once on all units of the tree instead of
  as a handful of tiny kernels per leaf.
  """

  def __init__(self, specs: Sequence[LayerSpec]):
    self.shapes = [spec.keepdims_shape for spec in specs]
    sizes = [math.prod(shape) for shape in self.shapes]
    self.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]

  def concat(self, values: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate([
        jnp.ravel(jnp.broadcast_to(v, shape))
        for v, shape in zip(values, self.shapes)])

  def split(self, flat: jax.Array) -> list[jax.Array]:
    return [flat[a:b].reshape(shape) for a, b, shape in
            zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

  def concat_fields(self, rows: Sequence[NamedTuple]) -> NamedTuple:
    """Per-leaf NamedTuples of per-unit values -> one of flat arrays."""
    return type(rows[0])(*map(self.concat, zip(*rows)))

  def split_fields(self, flat: NamedTuple) -> list[NamedTuple]:
    columns = [self.split(field) for field in flat]
    return [type(flat)(*row) for row in zip(*columns)]


class Recipe(NamedTuple):
  """One kind of update: its sums, when they are exact, and both branches.

  ``fast(sums, *per_unit)`` works on all units at once (concatenated);
  ``careful(spec, w, d, *per_unit, axis_name)`` on one leaf.
  """

  sums: Callable[..., Any]
  is_exact: Callable[[Any], jax.Array]
  fast: Callable[..., Coefficients]
  careful: Callable[..., Coefficients]


LAYCA_STEP = Recipe(tangent_sums, tangent_is_exact, fast_layca_step,
                    careful_layca_step)
BACK_ON_SPHERE = Recipe(sphere_sums, sphere_is_exact, fast_back_on_sphere,
                        careful_back_on_sphere)
LAYCA_UPDATE = Recipe(tangent_sums, tangent_is_exact, fast_layca_update,
                      careful_layca_update)


def use_fast(sums: NamedTuple, is_exact: Callable[[Any], jax.Array]) -> jax.Array:
  """Whether the fast branch serves the whole tree (all units exact)."""
  return jnp.all(is_exact(sums))


def coefficients(recipe: Recipe, specs: Sequence[LayerSpec | None],
                 w_leaves: Sequence[jax.Array], d_leaves: Sequence[jax.Array],
                 axis_names: Sequence[Any],
                 *per_unit: Sequence[Any]) -> list[Coefficients | None]:
  """Per-leaf coefficients of ``recipe`` (None at non-layer leaves).

  The fast branch serves every unit if it is exact on every unit; otherwise
  the careful one does, behind one ``lax.cond`` for the whole tree.

  Args:
    recipe: which update.
    specs: per-leaf layer specs (None at non-layer leaves).
    w_leaves, d_leaves: per-leaf weights and incoming arrays.
    axis_names: per-leaf mesh axes (see :class:`layca_jax._layers.UnitOptions`).
    *per_unit: per-leaf lists of per-unit values broadcastable to each
      layer's ``keepdims_shape`` (rates, multipliers, initial norms).
  """
  ids = [i for i, spec in enumerate(specs) if spec is not None]
  out: list[Coefficients | None] = [None] * len(specs)
  if not ids:
    return out
  layout = UnitLayout([specs[i] for i in ids])
  flat = [layout.concat([values[i] for i in ids]) for values in per_unit]
  sums = layout.concat_fields([
      recipe.sums(specs[i], w_leaves[i], d_leaves[i], axis_names[i])
      for i in ids])

  def careful():
    rows = zip(ids, *(layout.split(values) for values in flat))
    return layout.concat_fields([
        recipe.careful(specs[i], w_leaves[i], d_leaves[i], *extra,
                       axis_names[i]) for i, *extra in rows])

  chosen = jax.lax.cond(use_fast(sums, recipe.is_exact),
                        lambda: recipe.fast(sums, *flat), careful)
  for i, coef in zip(ids, layout.split_fields(chosen)):
    out[i] = coef
  return out
