"""The fused Layca optimizer: Algorithm 1 in closed form, one pass to read, one to write.

Since Layca's step is orthogonal to the weights, steps 1-4 of Algorithm 1
collapse, per rotation unit with weights ``w``, base direction ``d``, rate
``r`` and initial norm ``n0``, to

    w_new = K * (w / |w| - r * t / |t|),   t = d - c * w,   c = <d,w> / <w,w>,
          = alpha * w + beta * (d - c * w),  K = n0 / sqrt(1 + r^2),

with ``alpha = K / |w|``, ``beta = -K * r / |t|`` and
``|t|^2 = <d,d> - c * <d,w>``. So each step reads ``(w, d)`` once for the
three per-unit sums and once more for ``w_new``: the memory-traffic floor.

The sums are taken in float32 without the exact power-of-two scaling of
:mod:`layca_jax._numerics`. When every unit of the tree is in a range where
that is exact enough (no overflow, no underflow, no cancellation in ``|t|^2``,
all finite), the closed form is used; otherwise a single ``lax.cond`` over
the whole tree computes the coefficients the careful way (scaled sums, the
tangent's norm measured on the projected step, the result measured and put
back on the sphere, non-finite units skipped).
Either branch returns only per-unit coefficients, so the elementwise pass
stays outside the ``cond`` and fuses with the caller's ``apply_updates``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layca_jax import _layca
from layca_jax import _numerics as nx
from layca_jax._layca import LaycaState
from layca_jax._layers import LayerSpec, PerLeaf, UnitOptions

Rate = Any  # float, scalar array or optax schedule.

# Sums of squares in [2^-60, 2^60] lose nothing to flushed subnormal squares
# (< 2^-126 each, so < 2^-96 over 2^30 elements) and their products and
# ratios stay far from float32 overflow.
_SAFE_MIN = 2.0 ** -60
_SAFE_MAX = 2.0 ** 60
# |t|^2 = <d,d> - c <d,w> is trusted only while it keeps at least this
# fraction of <d,d>: rounding in the sums is then amplified by at most 8x.
_MIN_TANGENT_FRACTION = 2.0 ** -3
# beta * d is applied as beta1 * (beta2 * d), beta2 a power of two, so that
# neither factor underflows when |w| and |d| are ~2^120 apart.
_MAX_SHIFT = 100


class FusedLaycaState(NamedTuple):
  """State of a fused Layca optimizer.

  Attributes:
    count: steps taken (for rate schedules).
    base: the base optimizer's state (momentum, Adam moments, ...).
    layca: initial and last-seen per-unit norms and skipped-step counts, as
      in :class:`layca_jax.LaycaState` (read with :func:`layca_jax.skipped_steps`
      and :func:`layca_jax.norm_drift`).
  """

  count: jax.Array
  base: optax.OptState
  layca: LaycaState


class Coefficients(NamedTuple):
  """Per-unit coefficients of the update
  ``alpha_m1 * w + beta1 * (beta2 * d - gamma * w)``.

  ``beta2 * d - gamma * w`` is the tangent step (scaled by a power of two),
  formed before it is scaled so that a step nearly along the weights loses
  no more than the chain of links does. All shaped ``spec.keepdims_shape`` (float32, or wider for wider params).
  ``moves`` is False for units that keep their weights; ``finite`` is False
  for units whose direction held a NaN or Inf (counted as skipped); ``norm``
  is ``|w|``.
  """

  alpha_m1: jax.Array
  beta1: jax.Array
  beta2: jax.Array
  gamma: jax.Array
  moves: jax.Array
  finite: jax.Array
  norm: jax.Array


class UnitSums(NamedTuple):
  """Plain float32 per-unit sums ``<w,w>``, ``<d,w>``, ``<d,d>``."""

  ww: jax.Array
  dw: jax.Array
  dd: jax.Array


def unit_sums(spec: LayerSpec, w: jax.Array, d: jax.Array,
              axis_name) -> UnitSums:
  """The three sums of the closed form, shaped ``spec.keepdims_shape``.

  Unscaled, in float32 or wider, ``psum``-ed over ``axis_name``. Three plain
  sums rather than one variadic reduction: XLA:GPU fuses sibling reductions
  into one kernel, and on XLA:CPU three vectorised sums measured faster than
  one scalar variadic loop.
  """
  w32, d32 = nx.upcast(w), nx.upcast(d)
  return UnitSums(nx.unit_sum(w32 * w32, spec, axis_name),
                  nx.unit_sum(d32 * w32, spec, axis_name),
                  nx.unit_sum(d32 * d32, spec, axis_name))


def fast_is_exact(sums: UnitSums) -> jax.Array:
  """Per-unit: whether the unscaled closed form is exact enough here.

  False for non-finite, tiny (possible underflow), huge, or nearly parallel
  (cancellation in ``|t|^2``) units, which take the careful path.
  """
  in_range = lambda s: (s >= _SAFE_MIN) & (s <= _SAFE_MAX)
  ok = in_range(sums.ww) & in_range(sums.dd)
  ww = jnp.where(ok, sums.ww, 1.0)
  tt = sums.dd - (sums.dw / ww) * sums.dw
  return ok & (tt >= _MIN_TANGENT_FRACTION * sums.dd)


def fast_coefficients(sums: UnitSums, rate: jax.Array,
                      initial_norm: jax.Array) -> Coefficients:
  """Closed-form coefficients from the unscaled sums (valid where
  :func:`fast_is_exact`)."""
  ok = fast_is_exact(sums)
  ww = jnp.where(ok, sums.ww, 1.0)
  c = sums.dw / ww
  tt = jnp.where(ok, sums.dd - c * sums.dw, 1.0)
  inv_t = jax.lax.rsqrt(tt)
  w_norm = jnp.sqrt(ww)
  k = initial_norm / jnp.sqrt(1.0 + rate * rate)
  ones = jnp.ones_like(ok)
  return Coefficients(k / w_norm - 1.0, -k * rate * inv_t, jnp.ones_like(c), c,
                      ones, ones, jnp.where(ok, w_norm, jnp.nan))


def careful_coefficients(spec: LayerSpec, w: jax.Array, d: jax.Array,
                         rate: jax.Array, initial_norm: jax.Array,
                         axis_name) -> Coefficients:
  """Coefficients with exactly scaled sums, for any finite scale.

  As :func:`layca_jax.layca` then :func:`layca_jax.keep_norm`: the tangent's
  norm is measured on the projected step (no cancellation), a unit whose
  direction or weights are not finite, or whose weights are zero, keeps its
  weights.
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
  inv_t = jnp.where(has_step, jax.lax.rsqrt(jnp.where(has_step, tt, 1.0)), 0.0)
  # w = w_hat 2^ew, d = d_hat 2^ed, t_hat = d_hat - c w_hat, and
  # w_new = K (w_hat / |w_hat| - r t_hat / |t_hat|), where
  # t_hat = 2^-shift (beta2 d - gamma w) 2^(shift - ed).
  k_hat = jnp.ldexp(initial_norm / jnp.sqrt(1.0 + rate * rate), -ew)
  alpha = k_hat * jax.lax.rsqrt(ww)
  shift = jnp.clip(ed, -_MAX_SHIFT, _MAX_SHIFT)
  beta1 = jnp.ldexp(-k_hat * rate * inv_t, ew - (ed - shift))
  beta2 = jnp.ldexp(jnp.ones_like(alpha), -shift)
  gamma = jnp.ldexp(c, ed - shift - ew)
  # With the step nearly along the weights, alpha * w and beta * d nearly
  # cancel; rounding then moves the result off the sphere. Measure the
  # result as the elementwise pass will compute it, and rescale (keep_norm).
  w32 = nx.upcast(w)
  trial = alpha * w32 + beta1 * (beta2 * nx.upcast(d) - gamma * w32)
  t_hat, et, t_finite = nx.normalize_pow2(trial, spec, axis_name)
  trial_sq = nx.unit_sum(t_hat * t_hat, spec, axis_name)
  usable = moves & t_finite & (trial_sq > 0)
  rescale = jnp.where(usable, jnp.ldexp(
      initial_norm * jax.lax.rsqrt(jnp.where(usable, trial_sq, 1.0)),
      -et), 1.0)
  norm = jnp.where(moves, nx.ldexp_exact(jnp.sqrt(ww), ew),
                   jnp.where(w_finite, 0.0, jnp.nan))
  return Coefficients(alpha * rescale - 1.0, beta1 * rescale, beta2, gamma,
                      moves, d_finite, norm)


def apply_coefficients(coef: Coefficients, w: jax.Array, d: jax.Array,
                       dtype: Any) -> jax.Array:
  """The elementwise pass: the update ``w_new - w`` (zero where not moving)."""
  w32, d32 = nx.upcast(w), nx.upcast(d)
  update = coef.alpha_m1 * w32 + coef.beta1 * (coef.beta2 * d32 - coef.gamma * w32)
  return jnp.where(coef.moves, update, 0.0).astype(dtype)


def _whole_leaf(path: str, leaf: jax.Array) -> LayerSpec:
  """A spec making a whole (non-layer) leaf one unit."""
  return LayerSpec(path, tuple(jnp.shape(leaf)), 0, False)


def _finite_units(spec: LayerSpec, x: jax.Array, axis_name) -> jax.Array:
  """Per-unit flags (keepdims shape): False where the unit holds NaN/Inf."""
  return jnp.isfinite(nx.unit_max_abs(x, spec, axis_name))


def _rate_value(rate: Rate, count: jax.Array) -> jax.Array:
  return jnp.asarray(rate(count) if callable(rate) else rate, jnp.float32)


class _UnitLayout:
  """Lays per-unit values (``keepdims_shape`` per leaf) end to end, and back."""

  def __init__(self, specs: list[LayerSpec]):
    self.shapes = [spec.keepdims_shape for spec in specs]
    sizes = [math.prod(shape) for shape in self.shapes]
    self.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]

  def concat(self, values) -> jax.Array:
    return jnp.concatenate([jnp.ravel(v) for v in values])

  def split(self, flat: jax.Array) -> list[jax.Array]:
    return [flat[a:b].reshape(shape) for a, b, shape in
            zip(self.offsets[:-1], self.offsets[1:], self.shapes)]


def fused_layca(
    base: optax.GradientTransformation,
    learning_rate: Rate,
    non_layer_learning_rate: Rate | None,
    options: UnitOptions,
    multipliers: PerLeaf = None,
    *,
    base_has_state: bool = True,
) -> optax.GradientTransformation:
  """Algorithm 1 with base direction ``base``, as one transformation.

  Equals ``optax.chain(base, layca(), scale_by_learning_rate(rate),
  keep_norm())`` on layer leaves. Non-layer leaves are frozen (zero update,
  and zero gradients fed to ``base``) when ``non_layer_learning_rate`` is
  None, else follow ``base`` at that rate. A unit whose gradient holds NaN or
  Inf keeps its weights, is counted as skipped, and its gradient is zeroed
  before ``base`` (when ``base_has_state``) so that the base state stays
  finite; the same holds for a whole non-layer leaf that is trained.

  Args:
    base: the base direction (``optax.identity()``, ``optax.trace``,
      ``optax.scale_by_adam``, ...).
    learning_rate: rotation rate (float or schedule of the step count).
    non_layer_learning_rate: None (frozen) or a rate for non-layer leaves.
    options: which leaves are layers and their units.
    multipliers: per-unit rate multipliers, as in :func:`layca_jax.layca`.
    base_has_state: whether ``base`` keeps a state that non-finite gradients
      could poison; False skips the pre-base finiteness pass.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.
  """
  layca_link = _layca.layca(**options._asdict(), multipliers=multipliers)

  def init_fn(params):
    return FusedLaycaState(count=jnp.zeros([], jnp.int32),
                           base=base.init(params),
                           layca=layca_link.init(params))

  def update_fn(grads, state, params=None):
    specs = _layca.check_update_inputs('layca optimizer', grads, params,
                                       options.specs,
                                       state.layca.initial_norm)
    leaves, treedef = jax.tree.flatten(params)
    paths = [s.path if s is not None else '' for s in specs]
    grad_leaves = treedef.flatten_up_to(grads)
    axes = options.axis_names(params)
    trained_non_layer = non_layer_learning_rate is not None

    # Before base: zero the non-finite units (layers) or leaves (trained
    # non-layers), and every frozen leaf, so base state stays finite.
    grad_ok, base_in = [], []
    for spec, g, axis, path in zip(specs, grad_leaves, axes, paths):
      if spec is None and not trained_non_layer:
        grad_ok.append(None)
        base_in.append(jnp.zeros_like(g))
        continue
      unit = spec if spec is not None else _whole_leaf(path, g)
      if spec is None or base_has_state:
        ok = _finite_units(unit, g, axis)
        grad_ok.append(ok)
        base_in.append(jnp.where(ok, g, jnp.zeros_like(g)))
      else:
        grad_ok.append(None)
        base_in.append(g)
    directions, base_state = base.update(treedef.unflatten(base_in),
                                         state.base, params)
    # optax moments of integer leaves come back float32: keep the state's
    # dtypes fixed, as lax.scan carries and optax.apply_if_finite need.
    base_state = jax.tree.map(lambda new, old: new.astype(old.dtype),
                              base_state, state.base)
    d_leaves = treedef.flatten_up_to(directions)

    rate = _rate_value(learning_rate, state.count)
    mults = _layca.multiplier_values(multipliers, params, specs)
    n0_leaves = treedef.flatten_up_to(state.layca.initial_norm)
    layer_ids = [i for i, s in enumerate(specs) if s is not None]
    # The per-unit arithmetic runs once on all units of the tree, laid end
    # to end, instead of as a handful of tiny kernels per leaf.
    units = _UnitLayout([specs[i] for i in layer_ids])
    coefs = {}
    if layer_ids:
      rates = units.concat([
          jnp.broadcast_to(rate if mults[i] is None else rate * mults[i],
                           specs[i].keepdims_shape) for i in layer_ids])
      n0s = units.concat([nx.from_units(n0_leaves[i], specs[i])
                          for i in layer_ids])
      sums = UnitSums(*map(units.concat, zip(*[
          unit_sums(specs[i], leaves[i], d_leaves[i], axes[i])
          for i in layer_ids])))

      def careful():
        return Coefficients(*map(units.concat, zip(*[
            careful_coefficients(specs[i], leaves[i], d_leaves[i], r, n0,
                                 axes[i])
            for i, r, n0 in zip(layer_ids, units.split(rates),
                                units.split(n0s))])))

      flat = jax.lax.cond(jnp.all(fast_is_exact(sums)),
                          lambda: fast_coefficients(sums, rates, n0s), careful)
      split = Coefficients(*map(units.split, flat))
      coefs = {i: Coefficients(*(field[k] for field in split))
               for k, i in enumerate(layer_ids)}

    updates, norms, finite = [], [], []
    for i, (spec, g, d) in enumerate(zip(specs, grad_leaves, d_leaves)):
      if spec is None:
        norms.append(None)
        finite.append(None)
        if not trained_non_layer:
          updates.append(jnp.zeros_like(g))
        else:
          nl_rate = _rate_value(non_layer_learning_rate, state.count)
          step = (-nl_rate * nx.upcast(d)).astype(g.dtype)
          updates.append(jnp.where(grad_ok[i], step, jnp.zeros_like(step)))
        continue
      coef = coefs[i]
      if grad_ok[i] is not None:
        coef = coef._replace(moves=coef.moves & grad_ok[i],
                             finite=coef.finite & grad_ok[i])
      updates.append(apply_coefficients(coef, leaves[i], d, g.dtype))
      norms.append(nx.to_units(coef.norm, spec))
      finite.append(nx.to_units(coef.finite, spec))

    skipped = jax.tree.map(lambda c, f: c + (~f).astype(jnp.int32),
                           state.layca.skipped, treedef.unflatten(finite))
    new_layca = LaycaState(state.layca.initial_norm, treedef.unflatten(norms),
                           skipped)
    return treedef.unflatten(updates), FusedLaycaState(
        optax.safe_increment(state.count), base_state, new_layca)

  return optax.GradientTransformation(init_fn, update_fn)
