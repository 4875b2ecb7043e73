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

A unit whose initial norm ``n0`` is zero (a zero-initialised head, a LoRA
``B`` matrix, a zero-init gate) has no direction to rotate: it is a *free*
unit, trained by the incoming direction as it is (the ``layca`` link passes
its step through, ``keep_norm`` leaves it off any sphere, the fused
optimizers step it by ``-r * d``).

The coefficients come from per-unit sums read in one pass (the fast
branch). For the tangent step those sums are taken on values scaled by a
per-unit power of two and centred on a per-unit estimate of ``c`` (both read
from a small sample of each unit), so that zero steps, dead units, extreme
scales and steps nearly along the weights (stale momentum) are exact there
(on XLA:CPU, while no unit is centred or far from unit scale, each sum is
read as one product of the inputs, and otherwise the weights are read as
they are: :func:`shared_operands_cost_a_pass`).
When some unit is out of reach, a single switch over the whole tree (one
per layer leaf on TPU: :func:`leaves_stay_on_chip`; a ``lax.cond``, on GPU
a loop of at most one trip: :func:`switch`) takes the *refined* branch: the
leaves holding such units (on GPU every leaf) are summed again with each
unit's exact scale (its largest entries) and a centre read from the first
sums (:func:`refined_tangent_sums`), which serves a sample that missed the
few large entries of a sparse unit (a neuron fed by a handful of live
inputs). Only units still out of reach (non-finite values, zero weights) send the
tree to the *careful* branch (sums of values scaled by exact powers of two,
the tangent's norm measured on the projected step, the result measured and
put back on its sphere). Every branch returns only per-unit coefficients,
so the elementwise pass stays outside the switch and fuses with what
consumes it. :func:`recording_branches` sees which branch each switch took.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec

# |t|^2 = <e,e> - <e,w>^2/<w,w> (e the centred step) is trusted only while it
# keeps at least this fraction of <e,e>: rounding in the sums is then
# amplified by at most 64x (|t| exact to ~32 float32 epsilons, 4e-6).
_MIN_TANGENT_FRACTION = 2.0 ** -6
# Scaled sums up to this size are exact: an entry that could overflow when
# squared (> 2^64) would make the sum exceed 2^128 itself, and every product
# of the fast formulas stays in range (plain sums keep 2^60, see _numerics).
_SCALED_SUM_MAX = 2.0 ** 100
# Below this tangent fraction in its sample, a unit's step is centred on the
# sample's estimate of c before it is summed.
_CENTRE_BELOW = 2.0 ** -4
# Entries per unit read to estimate its scales and centre.
_SAMPLE_SIZE = 64
# Fast-branch scale exponents stay within +-_MAX_EXPONENT, so that 2**e is a
# normal float32 (a dead unit's momentum decays down to subnormals); units
# beyond take the careful branch.
_MAX_EXPONENT = 126
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


_HIGH_BITS = {jnp.dtype(jnp.float32): (jnp.uint32, 0xFFFFF000),
              jnp.dtype(jnp.float64): (jnp.uint64, 0xFFFFFFFFF8000000)}


def split_high(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``x = high + low`` exactly, ``high`` keeping the top half of the
  significand, so that the product of two ``high`` parts is exact."""
  if x.dtype not in _HIGH_BITS:
    return x, jnp.zeros_like(x)
  uint, mask = _HIGH_BITS[x.dtype]
  bits = jax.lax.bitcast_convert_type(x, uint) & jnp.asarray(mask, uint)
  high = jax.lax.bitcast_convert_type(bits, x.dtype)
  return high, x - high


def apply_coefficients(coef: Coefficients, w: jax.Array, d: jax.Array,
                       dtype: Any) -> jax.Array:
  """The elementwise pass: the update, zero where the unit does not move.

  ``beta2 * d - gamma * w`` is nearly zero for a step nearly along the
  weights; ``gamma * w`` is formed exactly (split products) before the
  subtraction, so the step keeps its own relative precision, not that of
  ``d``, and stays orthogonal to the weights however close it is to them.
  """
  acc = coef.beta1.dtype
  w32, d32 = w.astype(acc), d.astype(acc)
  step = minus_product(coef.beta2 * d32, coef.gamma, w32)
  update = coef.alpha_m1 * w32 + coef.beta1 * step
  return jnp.where(coef.moves, update, 0.0).astype(dtype)


def minus_product(a: jax.Array, c: jax.Array, w: jax.Array) -> jax.Array:
  """``a - c * w`` with ``c * w`` formed exactly: when ``a`` is nearly
  ``c * w`` the result keeps its own relative precision, not that of ``a``."""
  w_hi, w_lo = split_high(w)
  c_hi, c_lo = split_high(c)
  return ((a - c_hi * w_hi) - c_hi * w_lo) - c_lo * w


def pass_through(scale: jax.Array, finite: jax.Array,
                 norm: jax.Array) -> Coefficients:
  """``scale * d`` (the rule of free units), zero where ``d`` is not finite."""
  zeros = jnp.zeros_like(scale)
  return Coefficients(zeros, scale, jnp.ones_like(scale), zeros, finite,
                      finite, norm)


def _split_exponent(value: jax.Array, exponent: jax.Array):
  """``value * 2^exponent`` as ``(beta1, beta2)`` with ``beta2 = 2^-shift``
  a bounded power of two and ``beta1`` carrying the rest."""
  shift = jnp.clip(-exponent, -_MAX_SHIFT, _MAX_SHIFT)
  return (nx.ldexp_exact(value, exponent + shift),
          nx.pow2(-shift, value.dtype) * jnp.ones_like(value))


# ---------------------------------------------------------------------------
# Steps 1-2: the tangent step |w| t / |t|.


class TangentSums(NamedTuple):
  """Per-unit sums of the fast tangent, read in one pass.

  With ``w_hat = w * 2^-w_exp``, ``d_hat = d * 2^-d_exp`` and the centred
  step ``e = d_hat - centre * w_hat``: ``ww = <w_hat,w_hat>``,
  ``ew = <e,w_hat>``, ``ee = <e,e>``. ``w_exp``, ``d_exp`` (int32) and
  ``centre`` come from a sample of the unit (:func:`sample_estimates`).
  """

  ww: jax.Array
  ew: jax.Array
  ee: jax.Array
  w_exp: jax.Array
  d_exp: jax.Array
  centre: jax.Array


def _sample_positions(size: int) -> np.ndarray:
  """``min(size, _SAMPLE_SIZE)`` positions spread over ``range(size)``.

  A golden-ratio stride coprime with ``size`` visits far-apart entries, so
  that a structured stretch (the weights of an always-zero input pixel, a
  dead neuron, a padding row) cannot make up the whole sample.
  """
  if size <= _SAMPLE_SIZE:
    return np.arange(size)
  stride = int(size * 0.6180339887) | 1
  while math.gcd(stride, size) != 1:
    stride += 2
  return (np.arange(_SAMPLE_SIZE) * stride) % size


def _unit_sample(x: jax.Array, spec: LayerSpec) -> jax.Array:
  """Up to ``_SAMPLE_SIZE`` entries of each unit spread over its reduced
  axes, gathered without reshaping the leaf (no relayout on tiled memory):
  shaped ``stack + (n,) + outputs``."""
  reduced = tuple(spec.shape[a] for a in spec.reduce_axes)
  index = np.unravel_index(_sample_positions(math.prod(reduced)), reduced)
  stack = (slice(None),) * len(spec.stack_shape)
  outputs = (slice(None),) * (len(spec.shape) - len(spec.stack_shape)
                              - len(reduced))
  where = stack + tuple(index) + outputs
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if sharding is not None and any(
      getattr(sharding.mesh, 'explicit_axes', ())):
    # Explicit sharding (jax.make_mesh's default): say where the (tiny)
    # sample lives, replicated.
    return x.at[where].get(out_sharding=jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec()))
  return x[where]


def _peak_exponent(peak: jax.Array) -> jax.Array:
  """Exponent ``e`` with ``peak * 2^-e`` in ``[0.5, 1)`` (0 where zero or not
  finite), clipped to ``+-_MAX_EXPONENT``."""
  return jnp.clip(nx.frexp_exponent(peak), -_MAX_EXPONENT, _MAX_EXPONENT)


def _sample_rows(x: jax.Array, spec: LayerSpec) -> jax.Array:
  """:func:`_unit_sample` as one row per unit, ``(units, _SAMPLE_SIZE)``,
  units in the order of ``spec.keepdims_shape``, zero-padded (zeros change
  neither a unit's largest entry nor its sums)."""
  sample = _unit_sample(x, spec)
  axis = len(spec.stack_shape)
  rows = jnp.moveaxis(sample, axis, -1).reshape(-1, sample.shape[axis])
  return jnp.pad(rows, ((0, 0), (0, _SAMPLE_SIZE - rows.shape[1])))


Estimates = tuple[jax.Array, jax.Array, jax.Array]


def sample_estimates(specs: Sequence[LayerSpec], w_leaves: Sequence[jax.Array],
                     d_leaves: Sequence[jax.Array], axis_name) -> Estimates:
  """``(w_exp, d_exp, centre)`` per unit, from a sample of each unit.

  The exponents bring the sample's largest entries into ``[0.5, 1)``; the
  centre estimates ``c`` (in those scaled units) when the sample says the
  step is nearly along the weights, and is 0 otherwise, so that ``<e,e>`` of
  the centred step keeps the tangent's digits. The estimates only change
  rounding, never the result in exact arithmetic: a sample that misjudges
  its unit sends that unit's switch to the refined branch. The samples of
  all leaves given (sharing ``axis_name``) are laid end to end first: the
  statistics are a few small kernels for all of them, not a few per leaf.
  Each flat, over the units of all leaves in :class:`UnitLayout` order.
  """
  def rows(leaves):
    return jnp.concatenate([_sample_rows(nx.upcast(x), spec)
                            for x, spec in zip(leaves, specs)])

  def reduce(x, op, collective):
    r = op(x, axis=1)
    return collective(r, axis_name) if axis_name is not None else r

  ws, ds = rows(w_leaves), rows(d_leaves)
  w_exp = _peak_exponent(reduce(jnp.abs(ws), jnp.max, jax.lax.pmax))
  d_exp = _peak_exponent(reduce(jnp.abs(ds), jnp.max, jax.lax.pmax))
  ws = nx.scale_pow2(ws, -w_exp[:, None])
  ds = nx.scale_pow2(ds, -d_exp[:, None])
  sww = reduce(ws * ws, jnp.sum, jax.lax.psum)
  sdw = reduce(ds * ws, jnp.sum, jax.lax.psum)
  sdd = reduce(ds * ds, jnp.sum, jax.lax.psum)
  usable = (sww > 0) & (sdd > 0) & jnp.isfinite(sww) & jnp.isfinite(sdd)
  c = sdw / jnp.where(usable, sww, 1.0)
  parallel = usable & (sdd - c * sdw < _CENTRE_BELOW * sdd)
  return w_exp, d_exp, jnp.where(parallel, c, 0.0)


def tangent_sums(spec: LayerSpec, w: jax.Array, d: jax.Array, axis_name,
                 estimates: Estimates | None = None) -> TangentSums:
  """The sums of the fast tangent, shaped ``spec.keepdims_shape``.

  In float32 or wider, ``psum``-ed over ``axis_name``. Three plain sums
  rather than one variadic reduction: XLA:GPU fuses sibling reductions into
  one kernel, and on XLA:CPU the variadic form gave no consistent gain
  (``benchmarks/bench_sum_forms.py``). ``estimates`` are this leaf's
  :func:`sample_estimates`, shaped ``spec.keepdims_shape`` (taken here when
  not given).
  """
  if estimates is None:
    estimates = tuple(x.reshape(spec.keepdims_shape) for x in
                      sample_estimates([spec], [w], [d], axis_name))
  w_exp, d_exp, centre = estimates
  w_hat = nx.upcast(w) * nx.pow2(-w_exp, centre.dtype)
  e = minus_product(nx.upcast(d) * nx.pow2(-d_exp, centre.dtype), centre,
                    w_hat)
  return TangentSums(nx.unit_sum(w_hat * w_hat, spec, axis_name),
                     nx.unit_sum(e * w_hat, spec, axis_name),
                     nx.unit_sum(e * e, spec, axis_name), w_exp, d_exp, centre)


def refined_tangent_sums(spec: LayerSpec, w: jax.Array, d: jax.Array,
                         axis_name, first: TangentSums) -> TangentSums:
  """The tangent sums of a second pass, for units the sample misjudged.

  A sample misses the few large entries of a sparse unit (a neuron fed by
  a handful of live inputs, its momentum decayed to ~1e-17 elsewhere), so
  the scales it gives can be off by 2^50 and its centre meaningless. Here
  each unit's exponents come from its largest entries (exact), and its
  centre from the first pass's sums (their tangent removed:
  ``centre + ew / ww``) where those are finite, else from plain sums of the
  values scaled by those exponents where those are finite, else 0.
  ``first``: this leaf's :func:`tangent_sums`.
  """
  w_exp = _peak_exponent(nx.unit_max_abs(nx.upcast(w), spec, axis_name))
  d_exp = _peak_exponent(nx.unit_max_abs(nx.upcast(d), spec, axis_name))
  # c_hat = c * 2^(w_exp - d_exp) in the units of the scaled values.
  usable = jnp.isfinite(first.ww) & (first.ww > 0) & jnp.isfinite(first.ew)
  from_first = nx.ldexp_exact(
      first.centre + first.ew / jnp.where(usable, first.ww, 1.0),
      (w_exp - first.w_exp) - (d_exp - first.d_exp))
  # Plain sums of the values scaled by their largest entries (in range
  # whatever their scale) centre a unit whose first sums did not serve.
  w_hat = nx.upcast(w) * nx.pow2(-w_exp, first.ww.dtype)
  d_hat = nx.upcast(d) * nx.pow2(-d_exp, first.ww.dtype)
  ww = nx.unit_sum(w_hat * w_hat, spec, axis_name)
  dw = nx.unit_sum(d_hat * w_hat, spec, axis_name)
  plain = (ww > 0) & jnp.isfinite(ww) & jnp.isfinite(dw)
  from_plain = dw / jnp.where(plain, ww, 1.0)
  centre = jnp.where(usable, from_first, jnp.where(plain, from_plain, 0.0))
  centre = jnp.where(jnp.isfinite(centre), centre, 0.0)
  return tangent_sums(spec, w, d, axis_name, (w_exp, d_exp, centre))


def raw_exponent_band(specs: Sequence[LayerSpec],
                      dtype: Any) -> tuple[int, int]:
  """Sample peak exponents ``[lo, hi]`` within which the units of ``specs``
  lose nothing that matters to plain products in ``dtype``: no sum
  overflows, and the terms flushed to zero (each below the smallest normal)
  add up to less than 2^-6 of a rounding step of the unit's largest square."""
  info = jnp.finfo(dtype)
  n = max([math.prod(spec.shape[a] for a in spec.reduce_axes)
           for spec in specs] + [2])
  log_n = math.ceil(math.log2(n))
  return ((log_n + info.minexp + info.nmant + 11 + 1) // 2,
          (info.maxexp - 2 - log_n) // 2)


def _in_band(exponent: jax.Array, band: tuple[int, int]) -> jax.Array:
  """Per unit: a sample peak exponent within ``band``
  (:func:`raw_exponent_band`)."""
  lo, hi = band
  return (exponent >= lo) & (exponent <= hi)


def raw_sums_serve(estimates: Estimates, band: tuple[int, int]) -> jax.Array:
  """Whether :func:`raw_tangent_sums` give the units' sums: none is centred
  and every sample peak sits in ``band`` (:func:`raw_exponent_band`)."""
  w_exp, d_exp, centre = estimates
  return (jnp.all(centre == 0) & jnp.all(_in_band(w_exp, band))
          & jnp.all(_in_band(d_exp, band)))


def raw_tangent_sums(spec: LayerSpec, w: jax.Array, d: jax.Array,
                     axis_name, estimates: Estimates | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``<w,w>``, ``<d,w>``, ``<d,d>`` of the inputs as they are, each read as
  one product: no elementwise result feeds two reductions, which XLA:CPU
  would write out and read back (:func:`shared_operands_cost_a_pass`).
  ``estimates`` are not needed."""
  del estimates
  w32, d32 = nx.upcast(w), nx.upcast(d)
  return (nx.unit_sum(w32 * w32, spec, axis_name),
          nx.unit_sum(d32 * w32, spec, axis_name),
          nx.unit_sum(d32 * d32, spec, axis_name))


def scale_raw_tangent_sums(raw: Sequence[jax.Array], estimates: Estimates,
                           band: tuple[int, int] | None = None) -> TangentSums:
  """:func:`tangent_sums` from :func:`raw_tangent_sums` where
  :func:`raw_sums_serve`, scaled afterwards by the estimates' powers of two.

  Scaling by a power of two commutes with rounding between the normal
  bounds, so these are the sums of the scaled values but for terms far below
  their rounding. A unit whose peak the sample missed by far enough to
  overflow gets non-finite sums, and the refined branch. ``band`` is not
  needed (:func:`raw_sums_serve` checked it).
  """
  del band
  ww, dw, dd = raw
  w_exp, d_exp, centre = estimates
  return TangentSums(nx.ldexp_exact(ww, -2 * w_exp),
                     nx.ldexp_exact(dw, -w_exp - d_exp),
                     nx.ldexp_exact(dd, -2 * d_exp), w_exp, d_exp, centre)


def raw_weights_tangent_sums(spec: LayerSpec, w: jax.Array, d: jax.Array,
                             axis_name, estimates: Estimates
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`tangent_sums` with the weights as they are: ``<w,w>``,
  ``<e,w>`` and ``<e,e>``, ``e`` the scaled, centred step (its centre
  taken to the weights' own scale).

  The centred step feeds two sums whatever its form, but the scaled
  weights feed three: on XLA:CPU, leaving the weights unscaled saves
  writing out a scaled copy of every leaf (GPT-2-small/4, per unit: the
  closed-form step 7.3x -> 5.6x an SGD step, ``bench_sum_forms.py``).
  """
  w_exp, d_exp, centre = estimates
  w32 = nx.upcast(w)
  d_hat = nx.upcast(d) * nx.pow2(-d_exp, centre.dtype)
  e = minus_product(d_hat, centre * nx.pow2(-w_exp, centre.dtype), w32)
  return (nx.unit_sum(w32 * w32, spec, axis_name),
          nx.unit_sum(e * w32, spec, axis_name),
          nx.unit_sum(e * e, spec, axis_name))


def scale_raw_weights_tangent_sums(raw: Sequence[jax.Array],
                                   estimates: Estimates,
                                   band: tuple[int, int]) -> TangentSums:
  """:func:`tangent_sums` from :func:`raw_weights_tangent_sums`, the
  weights' sums scaled afterwards (as :func:`scale_raw_tangent_sums`).

  They are the scaled sums for units whose weights' sample peak sits in
  ``band`` (:func:`raw_exponent_band`). Elsewhere (a sparse unit whose
  sample saw only its decayed entries, weights near zero or huge) plain
  products of the weights may lose terms or overflow: there ``ew`` is NaN,
  so the unit is not served (the refined branch sums it again), while a
  free unit's rule, which reads only ``ww`` and ``ee``, still holds.
  """
  ww, ew, ee = raw
  w_exp, d_exp, centre = estimates
  ew = jnp.where(_in_band(w_exp, band), nx.ldexp_exact(ew, -w_exp), jnp.nan)
  return TangentSums(nx.ldexp_exact(ww, -2 * w_exp), ew, ee, w_exp, d_exp,
                     centre)


class RawSums(NamedTuple):
  """A recipe's sums read with fewer values scaled (see
  :func:`shared_operands_cost_a_pass`): ``sums(spec, w, d, axis_name,
  estimates)`` per leaf; ``scaled(raw, estimates, band)`` turns them,
  concatenated, into the recipe's sums, which they are for every unit
  where ``serve(estimates, band)``; with ``serve`` None, for the units
  ``scaled`` does not mark as not served."""

  name: str
  sums: Callable[..., tuple[jax.Array, ...]]
  scaled: Callable[..., Any]
  serve: Callable[..., jax.Array] | None


# XLA:CPU reads the first that serves, else the last.
RAW_TANGENT_SUMS = (
    RawSums('raw', raw_tangent_sums, scale_raw_tangent_sums, raw_sums_serve),
    RawSums('raw weights', raw_weights_tangent_sums,
            scale_raw_weights_tangent_sums, None))


def _in_scaled_range(sum_of_squares: jax.Array) -> jax.Array:
  """A scaled sum of squares no entry of which matters that underflowed,
  and far from overflow (False for NaN or Inf)."""
  return ((sum_of_squares >= nx.SAFE_SUM_MIN)
          & (sum_of_squares <= _SCALED_SUM_MAX))


def tangent_is_exact(sums: TangentSums) -> jax.Array:
  """Per-unit: whether the fast tangent is exact enough here.

  True for units of ordinary (scaled) size whose centred step is zero or
  keeps a tangent part without cancellation; False for non-finite units and
  for those the sample misjudged, which take the refined branch.
  """
  ok = _in_scaled_range(sums.ww) & (_in_scaled_range(sums.ee)
                                    | (sums.ee == 0))
  ww = jnp.where(ok, sums.ww, 1.0)
  tt = sums.ee - (sums.ew / ww) * sums.ew
  return ok & (tt >= _MIN_TANGENT_FRACTION * sums.ee)


class FastTangent(NamedTuple):
  """``|w_hat| t_hat / |t_hat| = ratio * (beta2 * d - gamma * w - along * w)``.

  ``t_hat = d_hat - c_hat w_hat`` is the tangent of the scaled step. The
  elementwise pass forms ``beta2 * d - gamma * w`` with ``gamma`` rounded to
  float; ``along`` is the part of ``w`` that rounding leaves in it, which
  the coefficients of ``w`` take back out, so the formed step stays
  orthogonal to the weights however nearly parallel the step is. ``moves``
  is False where ``t_hat`` is zero (a zero step, or one parallel to the
  weights to rounding); ``w_norm`` is ``|w|``.
  """

  ratio: jax.Array
  beta2: jax.Array
  gamma: jax.Array
  along: jax.Array
  w_scale: jax.Array
  ww: jax.Array
  tt: jax.Array
  moves: jax.Array
  w_norm: jax.Array


def fast_tangent(sums: TangentSums) -> FastTangent:
  """The tangent step's coefficients (valid where :func:`tangent_is_exact`)."""
  ok = tangent_is_exact(sums)
  ww = jnp.where(ok, sums.ww, 1.0)
  q = sums.ew / ww
  tt = sums.ee - q * sums.ew
  dd = sums.ee + sums.centre * (2.0 * sums.ew + sums.centre * ww)
  moves = ok & nx.has_tangent(tt, dd)
  tt = jnp.where(moves, tt, 1.0)
  c_hat = sums.centre + q
  w_scale = nx.pow2(sums.w_exp, ww.dtype)
  w_unscale = nx.pow2(-sums.w_exp, ww.dtype)
  return FastTangent(
      ratio=jnp.sqrt(ww) * jax.lax.rsqrt(tt),
      beta2=nx.pow2(-sums.d_exp, ww.dtype),
      gamma=c_hat * w_unscale,
      along=(q - (c_hat - sums.centre)) * w_unscale,
      w_scale=w_scale, ww=ww, tt=tt, moves=moves,
      w_norm=w_scale * jnp.sqrt(ww))


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
                        nx.pow2(-shift, ww.dtype),
                        nx.ldexp_exact(c, ed - shift - ew), ww, ew, moves,
                        d_finite,
                        norm)


def _sphere_factor(spec: LayerSpec, x: jax.Array, n0: jax.Array, axis_name):
  """``(factor, exponent, usable)`` with ``|x * ldexp(factor, exponent)| = n0``.

  ``usable`` is False where ``x`` is zero or not finite.
  """
  x_hat, ex, finite = nx.normalize_pow2(x, spec, axis_name)
  xx = nx.unit_sum(x_hat * x_hat, spec, axis_name)
  usable = finite & (xx > 0)
  return n0 * jax.lax.rsqrt(jnp.where(usable, xx, 1.0)), -ex, usable


def _tangent_free(sums: TangentSums, rate: jax.Array) -> Coefficients:
  """A free unit: ``rate * d``, zero (and skipped) where ``d`` is not finite
  (or ``w`` is NaN). ``ww`` may overflow where read from huge weights as
  they are (:func:`raw_weights_tangent_sums`): the norm is then Inf."""
  finite = jnp.isfinite(sums.ee) & ~jnp.isnan(sums.ww)
  w_norm = (jnp.sqrt(jnp.where(finite, sums.ww, jnp.nan))
            * nx.pow2(sums.w_exp, sums.ww.dtype))
  return pass_through(rate, finite, w_norm)


# ---------------------------------------------------------------------------
# The layca link: steps 1-2, times each unit's multiplier.


def fast_layca_step(sums: TangentSums, n0: jax.Array,
                    multiplier: jax.Array) -> Coefficients:
  del n0
  t = fast_tangent(sums)
  beta1 = multiplier * t.w_scale * t.ratio
  return Coefficients(-beta1 * t.along, beta1, t.beta2, t.gamma, t.moves,
                      jnp.ones_like(t.moves), t.w_norm)


def careful_layca_step(spec: LayerSpec, w: jax.Array, d: jax.Array,
                       n0: jax.Array, multiplier: jax.Array,
                       axis_name) -> Coefficients:
  del n0
  t = careful_tangent(spec, w, d, axis_name)
  return Coefficients(jnp.zeros_like(t.ratio),
                      nx.ldexp_exact(multiplier * t.ratio, t.exponent),
                      t.beta2,
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
  """Per-unit: ``|w + u|`` in range and ``u`` finite.

  ``|u|^2`` only tells a moving unit from one that keeps its weights: one of
  exactly zero with ``|w + u|`` in range means every entry of ``u`` is zero
  or below ``2^-63``, below float32 resolution of the unit, so treating the
  unit as not moving loses nothing.
  """
  return nx.in_safe_range(sums.xx) & jnp.isfinite(sums.uu)


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


def _sphere_free(sums: SphereSums, n0: jax.Array) -> Coefficients:
  """A free unit: its update passes through, dropped where not finite."""
  finite = jnp.isfinite(sums.uu)
  return pass_through(jnp.ones_like(n0), finite,
                      jnp.full_like(n0, jnp.nan))


# ---------------------------------------------------------------------------
# The fused optimizers: steps 1-4 at rate r.


def fast_layca_update(sums: TangentSums, n0: jax.Array,
                      rate: jax.Array) -> Coefficients:
  t = fast_tangent(sums)
  k = n0 / jnp.sqrt(1.0 + rate * rate)
  beta1 = -rate * k * jax.lax.rsqrt(t.tt)
  return Coefficients(k / t.w_norm - 1.0 - beta1 * t.along, beta1, t.beta2,
                      t.gamma, t.moves, jnp.ones_like(t.moves), t.w_norm)


def careful_layca_update(spec: LayerSpec, w: jax.Array, d: jax.Array,
                         n0: jax.Array, rate: jax.Array,
                         axis_name) -> Coefficients:
  """As :func:`layca_jax.layca` then :func:`layca_jax.keep_norm`.

  ``K / |w|`` is formed on scaled values (``K`` and ``|w|`` are close), and
  the result, measured as the elementwise pass will compute it, is rescaled
  onto the sphere: with the step nearly along the weights, ``alpha * w`` and
  the step nearly cancel and rounding would move it off.
  """
  t = careful_tangent(spec, w, d, axis_name)
  alpha = (nx.ldexp_exact(n0 / jnp.sqrt(1.0 + rate * rate), -t.w_scale)
           * jax.lax.rsqrt(t.ww))
  beta1 = nx.ldexp_exact(-rate * alpha * t.ratio, t.exponent)
  w32 = nx.upcast(w).astype(alpha.dtype)
  trial = alpha * w32 + beta1 * (t.beta2 * nx.upcast(d).astype(alpha.dtype)
                                 - t.gamma * w32)
  factor, exponent, usable = _sphere_factor(spec, trial, n0, axis_name)
  rescale = jnp.where(t.moves & usable, nx.ldexp_exact(factor, exponent),
                      1.0)
  # No step (zero or parallel to the weights): keep the weights exactly, as
  # keep_norm does after a zero step in the chain of links.
  return Coefficients(alpha * rescale - 1.0, beta1 * rescale, t.beta2, t.gamma,
                      t.moves & (t.ratio > 0), t.finite, t.norm)


def _update_free(sums: TangentSums, n0: jax.Array,
                 rate: jax.Array) -> Coefficients:
  del n0
  return _tangent_free(sums, -rate)


def _step_free(sums: TangentSums, n0: jax.Array,
               multiplier: jax.Array) -> Coefficients:
  del n0
  return _tangent_free(sums, multiplier)


# ---------------------------------------------------------------------------
# The switch.


class UnitLayout:
  """Lays per-unit values (``keepdims_shape`` per leaf) end to end, and back.

  The per-unit arithmetic then runs once on all units of a group of leaves
  instead of as a handful of tiny kernels per leaf.
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
  """One kind of update: its sums, when they are exact, and its branches.

  ``fast(sums, n0, *per_unit)`` and ``free(sums, n0, *per_unit)`` work on
  all units of a group at once (concatenated); ``careful(spec, w, d, n0,
  *per_unit, axis_name)`` on one leaf. ``free`` gives the coefficients of
  units whose initial norm ``n0`` is zero. ``estimates(specs, ws, ds,
  axis_name)``, when given, is taken once for the leaves of a group that
  share ``axis_name`` and passed on to each leaf's ``sums``; ``raw``, when
  given, are the same sums read with fewer values scaled. ``refine(spec,
  w, d, axis_name, sums)``, when given, gives one leaf's sums of a second
  pass from its first ``sums``; it is tried on the leaves where the first
  did not serve every unit, before the careful branch.
  """

  sums: Callable[..., Any]
  is_exact: Callable[[Any], jax.Array]
  fast: Callable[..., Coefficients]
  careful: Callable[..., Coefficients]
  free: Callable[..., Coefficients]
  estimates: Callable[..., Estimates] | None = None
  raw: Sequence[RawSums] = ()
  refine: Callable[..., Any] | None = None


LAYCA_STEP = Recipe(tangent_sums, tangent_is_exact, fast_layca_step,
                    careful_layca_step, _step_free, sample_estimates,
                    RAW_TANGENT_SUMS, refined_tangent_sums)
BACK_ON_SPHERE = Recipe(sphere_sums, sphere_is_exact, fast_back_on_sphere,
                        careful_back_on_sphere,
                        lambda sums, n0: _sphere_free(sums, n0))
LAYCA_UPDATE = Recipe(tangent_sums, tangent_is_exact, fast_layca_update,
                      careful_layca_update, _update_free, sample_estimates,
                      RAW_TANGENT_SUMS, refined_tangent_sums)


def group_sums(recipe: Recipe, layout: UnitLayout,
               specs: Sequence[LayerSpec], w_leaves: Sequence[jax.Array],
               d_leaves: Sequence[jax.Array],
               axis_names: Sequence[Any]) -> NamedTuple:
  """``recipe.sums`` of the leaves, laid end to end (``layout``), with the
  estimates taken once per mesh axis.

  Where :func:`shared_operands_cost_a_pass`, the leaves take the first of
  ``recipe.raw`` that serves every one of their units, else its last (the
  same values, fewer passes there), behind one ``lax.switch``.
  """
  def each_leaf(form, *extra):
    return [form(spec, w, d, axis_name, *more) for spec, w, d, axis_name, *more
            in zip(specs, w_leaves, d_leaves, axis_names, *extra)]

  if recipe.estimates is None:
    return layout.concat_fields(each_leaf(recipe.sums))
  by_axis: dict[Any, list[int]] = {}
  for k, axis_name in enumerate(axis_names):
    by_axis.setdefault(axis_name, []).append(k)
  if len(by_axis) == 1:
    estimates = recipe.estimates(specs, w_leaves, d_leaves, axis_names[0])
  else:
    per_leaf: list[Any] = [None] * len(specs)
    for axis_name, ks in by_axis.items():
      group = UnitLayout([specs[k] for k in ks])
      flat = recipe.estimates([specs[k] for k in ks],
                              [w_leaves[k] for k in ks],
                              [d_leaves[k] for k in ks], axis_name)
      for k, *leaf in zip(ks, *map(group.split, flat)):
        per_leaf[k] = leaf
    estimates = tuple(map(layout.concat, zip(*per_leaf)))

  # Split here, inside the branch that uses them: outside, XLA:CPU would
  # write out each leaf's estimates before the conditional.
  leaf_estimates = lambda: list(zip(*map(layout.split, estimates)))
  scaled = lambda: layout.concat_fields(each_leaf(recipe.sums,
                                                  leaf_estimates()))
  if not recipe.raw or not shared_operands_cost_a_pass():
    return scaled()

  band = raw_exponent_band(specs, nx.accumulation_dtype(w_leaves[0].dtype))

  def read(form):
    sums = map(layout.concat, zip(*each_leaf(form.sums, leaf_estimates())))
    return form.scaled(tuple(sums), estimates, band)

  serves = [form.serve(estimates, band) for form in recipe.raw[:-1]]
  return jax.lax.switch(jnp.argmax(jnp.stack(serves + [jnp.bool_(True)])),
                        [functools.partial(read, form) for form in recipe.raw])


def fast_serves(recipe: Recipe, sums: NamedTuple, n0: jax.Array) -> jax.Array:
  """Per unit: whether the fast branch is exact there (free units always
  are: their rule does not need the sums to be exact)."""
  return recipe.is_exact(sums) | (n0 == 0)


def use_fast(serves: Sequence[jax.Array]) -> jax.Array:
  """Whether the fast branch serves the whole tree (every unit)."""
  return jnp.all(jnp.stack([jnp.all(s) for s in serves]))


# The branches of the switch, as :func:`branch_taken` sees them.
FAST, REFINED, CAREFUL = 0, 1, 2


# The lists :func:`recording_branches` has open, outermost first.
_RECORDINGS: list[list[jax.Array]] = []


def branch_taken(branch: jax.Array) -> jax.Array:
  """Where a switch went (``FAST``, ``REFINED`` or ``CAREFUL``: an int32
  scalar), returned as is. Called once per switch as the update is traced;
  appended to each list :func:`recording_branches` has open.
  """
  for branches in _RECORDINGS:
    branches.append(branch)
  return branch


@contextlib.contextmanager
def recording_branches() -> Iterator[list[jax.Array]]:
  """Within it, each switch appends the branch it took (:func:`branch_taken`)
  to the list yielded, as traced: a concrete int32 eagerly, a value to
  return from ``jax.jit`` when opened inside the jitted function. A signal
  that costs nothing, for tests and benchmarks.

  >>> import jax.numpy as jnp, layca_jax as lx
  >>> tx = lx.layca_sgd(0.1)
  >>> params = {'k': jnp.ones((4, 3))}
  >>> grads = {'k': jnp.arange(12.0).reshape(4, 3)}
  >>> with recording_branches() as branches:
  ...   _ = tx.update(grads, tx.init(params), params)
  >>> [int(b) for b in branches] == [FAST]
  True
  """
  branches: list[jax.Array] = []
  _RECORDINGS.append(branches)
  try:
    yield branches
  finally:
    _RECORDINGS.remove(branches)


def _select(where: jax.Array, a: Coefficients, b: Coefficients) -> Coefficients:
  return Coefficients(*(jnp.where(where, x, y) for x, y in zip(a, b)))


def compiling_for() -> str:
  """The platform the update is traced for: ``jax.default_backend()``.

  Read when tracing by :func:`leaves_stay_on_chip`,
  :func:`shared_operands_cost_a_pass` and
  :func:`conditionals_run_both_branches`, which lay the same update out for
  that platform's compiler (benchmarks and tests that trace for another
  platform replace this function).
  """
  return jax.default_backend()


def shared_operands_cost_a_pass() -> bool:
  """Whether XLA writes out an elementwise result that several reductions
  read, and reads it back for each.

  XLA:CPU does: it fuses a reduction with its producers only when nothing
  else reads them, and then only simple ones, so :func:`tangent_sums`'s
  scaled weights and centred step are written out and read back
  (GPT-2-small/4: ``lx.layca_sgd`` ~4.4x ``optax.sgd``). Where the sample
  allows it, :func:`raw_tangent_sums` reads each sum from the inputs as
  they are; elsewhere :func:`raw_weights_tangent_sums` reads the weights
  as they are and only the step scaled and centred (the centred step is
  all it writes out; units whose weights' sample peak is far from unit
  scale take the refined branch). One ``lax.switch`` for the tree picks
  the form (:func:`group_sums`; a conditional per leaf cost XLA:CPU ~0.6x
  ``optax.sgd``, one for the tree nothing measurable).
  XLA:GPU and XLA:TPU fuse sibling reductions with what they share: one
  form, no conditional. Numbers: benchmarks/README.md.
  """
  return compiling_for() == 'cpu'


def conditionals_run_both_branches() -> bool:
  """Whether XLA would compute both branches of the fast/careful switch.

  XLA:GPU does: its conditional simplifier replaces a two-way conditional
  whose branches hold only elementwise operations, reductions, slices and
  the like (both of ours) with both branches and a select. On one H200,
  ResNet-50 shapes, ``lx.layca_sgd`` took 2.29 ms per step, the careful
  branch alone 2.19 ms, the fast branch alone 0.68 ms: the switch ran the
  careful branch on every step. There :func:`switch` gates the careful
  branch behind a ``lax.while_loop`` of at most one trip, which XLA keeps
  (0.75 ms), and differentiates it as the conditional. XLA:CPU and XLA:TPU
  keep the conditional. Decided when tracing (:func:`compiling_for`).
  Numbers: benchmarks/README.md.
  """
  return compiling_for() == 'gpu'


def switch(fast_serves_all: jax.Array, fast: Callable[..., Any],
           careful: Callable[..., Any], *operands: Any) -> Any:
  """``fast(*operands)`` where ``fast_serves_all``, else
  ``careful(*operands)``, running only the branch taken (both return the
  same structure of arrays).

  A ``lax.cond``; where :func:`conditionals_run_both_branches`, the fast
  result (a few operations on per-unit sums) is always computed and
  replaced by ``careful(*operands)`` in a loop that runs once or not at
  all. A switch inside a branch of another passes what it needs as
  ``operands``: integer values its branches closed over would be traced
  into them as they stand (``jax.closure_convert`` lifts only floats).
  """
  if not conditionals_run_both_branches():
    return jax.lax.cond(fast_serves_all, fast, careful, *operands)
  # Explicit operands (the float values the branches close over), so that
  # the loop's derivative can be given: reverse mode cannot go through a
  # while loop, it goes through this conditional's.
  fast, fast_consts = jax.closure_convert(fast, *operands)
  careful, careful_consts = jax.closure_convert(careful, *operands)
  return _gated_switch(fast, careful, fast_serves_all, operands, fast_consts,
                       careful_consts)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _gated_switch(fast, careful, fast_serves_all, operands, fast_consts,
                  careful_consts):
  _, chosen = jax.lax.while_loop(
      lambda carry: carry[0],
      lambda carry: (jnp.zeros_like(carry[0]),
                     careful(*operands, *careful_consts)),
      (jnp.logical_not(fast_serves_all), fast(*operands, *fast_consts)))
  return chosen


@_gated_switch.defjvp
def _gated_switch_jvp(fast, careful, primals, tangents):
  fast_serves_all, operands, fast_consts, careful_consts = primals
  _, operand_tangents, fast_tangents, careful_tangents = tangents
  return jax.lax.cond(
      fast_serves_all,
      lambda: jax.jvp(fast, (*operands, *fast_consts),
                      (*operand_tangents, *fast_tangents)),
      lambda: jax.jvp(careful, (*operands, *careful_consts),
                      (*operand_tangents, *careful_tangents)))


def leaves_stay_on_chip() -> bool:
  """Whether XLA keeps a leaf's arrays in on-chip memory between the fusions
  that read them, as long as nothing waits on other leaves in between.

  XLA:TPU does (VMEM, for leaves that fit); XLA:GPU and XLA:CPU do not. Where
  it does, each layer leaf gets its own switch (with one for the tree, every
  leaf's elementwise pass waits for every leaf's sums, and XLA:TPU reads
  ``w`` and ``d`` from HBM twice) and a stateful base's direction is left to
  XLA rather than written once (:func:`layca_jax._fused.fused_layca`): HBM
  traffic on GPT-2-small, SGD / momentum / Adam, 1.21x / 1.41x / 1.35x their
  optax base (at 7b6db23; at 747416e 1.59x / 1.41x / 1.35x, and 1.67x /
  1.66x / 1.61x with neither). Elsewhere the
  tree keeps one switch (a conditional per leaf cost XLA:CPU ~40 us each;
  on XLA:GPU each switch reads its predicate on the host). Decided when
  tracing (:func:`compiling_for`); either way gives the same update to
  float32 rounding (only which leaves take the refined or careful branch
  differs). Numbers: benchmarks/README.md.
  """
  return compiling_for() == 'tpu'


def coefficients(recipe: Recipe, specs: Sequence[LayerSpec | None],
                 w_leaves: Sequence[jax.Array], d_leaves: Sequence[jax.Array],
                 axis_names: Sequence[Any], n0s: Sequence[Any],
                 *per_unit: Sequence[Any]) -> list[Coefficients | None]:
  """Per-leaf coefficients of ``recipe`` (None at non-layer leaves).

  Leaves are grouped by accumulation dtype (float32, or the params' own
  wider dtype), so that each is computed at its own precision and keeps it.
  The fast branch serves the leaves behind one switch if it is exact on
  every unit of theirs; otherwise the refined one (``recipe.refine``) or,
  where that is not exact either, the careful one does, behind one
  :func:`switch` for the whole tree (one per leaf where
  :func:`leaves_stay_on_chip`). Free units (``n0 == 0``) follow ``recipe.free``
  on every branch.

  Args:
    recipe: which update.
    specs: per-leaf layer specs (None at non-layer leaves).
    w_leaves, d_leaves: per-leaf weights and incoming arrays.
    axis_names: per-leaf mesh axes (see :class:`layca_jax._layers.UnitOptions`).
    n0s: per-leaf initial norms, broadcastable to ``keepdims_shape``.
    *per_unit: per-leaf lists of per-unit values broadcastable to each
      layer's ``keepdims_shape`` (rates, multipliers).
  """
  out: list[Coefficients | None] = [None] * len(specs)
  layers = [i for i, spec in enumerate(specs) if spec is not None]
  switched = [[i] for i in layers] if leaves_stay_on_chip() else [layers]
  for ids in switched:
    if ids:
      out_ids = _switched_coefficients(recipe, specs, w_leaves, d_leaves,
                                       axis_names, n0s, per_unit, ids)
      for i, coef in out_ids.items():
        out[i] = coef
  return out


def _switched_coefficients(recipe: Recipe, specs, w_leaves, d_leaves,
                           axis_names, n0s, per_unit,
                           layer_ids: list[int]) -> dict[int, Coefficients]:
  """:func:`coefficients` of the leaves ``layer_ids``, behind one switch."""
  groups: dict[Any, list[int]] = {}
  for i in layer_ids:
    dtype = jnp.promote_types(nx.accumulation_dtype(w_leaves[i].dtype),
                              nx.accumulation_dtype(d_leaves[i].dtype))
    groups.setdefault(jnp.dtype(dtype), []).append(i)

  prepared = []
  for dtype, ids in groups.items():
    layout = UnitLayout([specs[i] for i in ids])
    flat = [layout.concat([jnp.asarray(values[i]).astype(dtype)
                           for i in ids])
            for values in (n0s, *per_unit)]
    sums = group_sums(recipe, layout, [specs[i] for i in ids],
                      [w_leaves[i].astype(dtype) for i in ids],
                      [d_leaves[i].astype(dtype) for i in ids],
                      [axis_names[i] for i in ids])
    prepared.append((ids, layout, flat, sums))

  def fast():
    return ([recipe.fast(sums, *flat) for _, _, flat, sums in prepared],
            jnp.int32(FAST))

  def careful():
    results = []
    for ids, layout, flat, _ in prepared:
      rows = zip(ids, *(layout.split(values) for values in flat))
      results.append(layout.concat_fields([
          recipe.careful(specs[i], w_leaves[i], d_leaves[i], *extra,
                         axis_names[i]) for i, *extra in rows]))
    return results, jnp.int32(CAREFUL)

  serves = [fast_serves(recipe, sums, flat[0])
            for _, _, flat, sums in prepared]

  def refined():
    """A second pass (``recipe.refine``) on the leaves where the first did
    not serve every unit (on every leaf on XLA:GPU); the careful branch
    where it still does not."""
    results, still = [], []
    alone = sum(len(ids) for ids, *_ in prepared) == 1
    for (ids, layout, flat, sums), first_serves in zip(prepared, serves):
      leaves = []
      for i, first, leaf_serves in zip(ids, layout.split_fields(sums),
                                       layout.split(first_serves)):
        second = functools.partial(recipe.refine, specs[i], w_leaves[i],
                                   d_leaves[i], axis_names[i])
        if alone or conditionals_run_both_branches():
          # Alone, the leaf is here because it needs the second pass; on
          # XLA:GPU each switch's loop has the host read its predicate (~60
          # us): one per leaf would cost more than summing every leaf again.
          leaves.append(second(first))
        else:
          leaves.append(switch(jnp.all(leaf_serves), lambda first: first,
                               second, first))
      both = type(sums)(*(jnp.where(first_serves, a, b) for a, b in
                          zip(sums, layout.concat_fields(leaves))))
      results.append(recipe.fast(both, *flat))
      still.append(fast_serves(recipe, both, flat[0]))
    return switch(use_fast(still),
                  lambda results: (results, jnp.int32(REFINED)),
                  lambda results: careful(), results)

  chosen, branch = switch(use_fast(serves), fast,
                          careful if recipe.refine is None else refined)
  branch_taken(branch)
  out = {}
  for (ids, layout, flat, sums), coef in zip(prepared, chosen):
    # Free units follow their own rule on every branch (their first sums
    # serve it: the refined branch keeps them).
    coef = _select(flat[0] == 0, recipe.free(sums, *flat), coef)
    for i, leaf_coef in zip(ids, layout.split_fields(coef)):
      out[i] = leaf_coef
  return out
