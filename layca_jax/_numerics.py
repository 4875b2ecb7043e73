"""Per-unit reductions that accumulate in float32 and never overflow.

Every norm and dot product in layca-jax goes through this module. Values are
first scaled, per unit, by a power of two that brings their largest magnitude
into ``[0.5, 1)``: the scaling is exact, and no finite input can then overflow
or underflow a sum of squares. Sums accumulate in ``float32`` (or wider when
the input is wider), whatever the dtype of the params, and are ``psum``-ed
over ``axis_name`` when a layer is split across devices.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layca_jax._layers import LayerSpec

AxisName = Any  # str, a tuple of str, or None.

# Plain (unscaled) float32 sums of squares in [2^-60, 2^60] are safe: the
# squares flushed to zero are each < 2^-126, so < 2^-96 over 2^30 elements,
# far below the sum's rounding; no term can overflow, and products and
# ratios of two such sums stay far from the float32 range.
SAFE_SUM_MIN = 2.0 ** -60
_SAFE_SUM_MAX = 2.0 ** 60


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """float32, or the input dtype where it is wider."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
  return x.astype(accumulation_dtype(x.dtype))


def unit_sum(x: jax.Array, spec: LayerSpec, axis_name: AxisName) -> jax.Array:
  """Per-unit sum, shaped ``spec.keepdims_shape``, global over ``axis_name``."""
  s = jnp.sum(x, axis=spec.reduce_axes, keepdims=True)
  return jax.lax.psum(s, axis_name) if axis_name is not None else s


def in_safe_range(sum_of_squares: jax.Array) -> jax.Array:
  """Whether a plain float32 sum of squares can be used as it is (False for
  NaN or Inf): no underflow that matters, no overflow anywhere near."""
  return (sum_of_squares >= SAFE_SUM_MIN) & (sum_of_squares <= _SAFE_SUM_MAX)


def unit_max_abs(x: jax.Array, spec: LayerSpec,
                 axis_name: AxisName) -> jax.Array:
  """Per-unit largest magnitude; NaN where the unit holds a NaN."""
  m = jnp.max(jnp.abs(x), axis=spec.reduce_axes, keepdims=True)
  return jax.lax.pmax(m, axis_name) if axis_name is not None else m


def normalize_pow2(x: jax.Array, spec: LayerSpec,
                   axis_name: AxisName) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Scales each unit of ``x`` (already upcast) by an exact power of two.

  Returns:
    ``(x_hat, exponent, finite)``: ``x == ldexp_exact(x_hat, exponent)`` with
    ``max|x_hat|`` in ``[0.5, 1)`` (zero units stay zero),
    and per-unit flags that are False where the unit holds a NaN or Inf
    (``x_hat`` is zero there). The exponent is returned rather than
    ``2**exponent``, which overflows for peaks of ``2**127`` and above.
  """
  peak = unit_max_abs(x, spec, axis_name)
  finite = jnp.isfinite(peak)
  exponent = jnp.where(finite & (peak > 0), frexp_exponent(peak), 1)
  return scale_pow2(jnp.where(finite, x, 0.0), -exponent), exponent, finite


def scale_pow2(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` for a per-unit (broadcastable) integer exponent.

  Two multiplications by powers of two, each a normal float for exponents
  of up to twice the float range: exact wherever the result is a normal
  float. Inputs and results below the normal range are what the platform's
  arithmetic makes of them (XLA on CPU and TPU flushes them to zero, as it
  does in every other step of the update). ``jnp.ldexp`` would be exact
  there too, but costs ~17x a multiplication per element on XLA:CPU.
  """
  half = jax.lax.shift_right_arithmetic(exponent, jnp.ones_like(exponent))
  return x * pow2(half, x.dtype) * pow2(exponent - half, x.dtype)


@functools.partial(jax.jit, static_argnums=1)
def pow2(exponent: jax.Array, dtype: Any) -> jax.Array:
  """``2**exponent`` in ``dtype``, exactly, for integer exponents in the
  normal range ``[finfo.minexp, finfo.maxexp - 1]`` (others give garbage:
  callers bound theirs, :func:`ldexp_exact` takes any).

  Written from its bits (an add, a shift, a bitcast): ``jnp.ldexp(1.0, e)``
  takes a ``frexp`` and a floating-point power, ~40 operations that XLA
  copies into every fusion reading the result; with a few such scales per
  unit they made up over half of the update's compiled instructions, and
  of its compile time.

  >>> import jax.numpy as jnp
  >>> pow2(jnp.array([-126, 0, 3]), jnp.float32)
  Array([1.1754944e-38, 1.0000000e+00, 8.0000000e+00], dtype=float32)
  """
  info = jnp.finfo(dtype)
  bits = jnp.dtype(f'int{info.bits}')
  biased = jnp.asarray(exponent).astype(bits) + (info.maxexp - 1)
  return jax.lax.bitcast_convert_type(
      jax.lax.shift_left(biased, jnp.asarray(info.nmant, bits)), dtype)


@jax.jit
def ldexp_exact(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` for per-unit values, as ``jnp.ldexp`` computes it.

  Three multiplications by :func:`pow2` factors, so that none leaves the
  float range however far the exponent goes (any exponent that a finite
  ``x`` survives fits in three): exact wherever the result is a normal
  float, zero or infinite where it leaves the range, NaN, infinities and
  zeros kept.

  >>> import jax.numpy as jnp
  >>> ldexp_exact(jnp.float32(3.0), jnp.array([-100, 4, 300]))
  Array([2.3665827e-30, 4.8000000e+01,           inf], dtype=float32)
  """
  info = jnp.finfo(x.dtype)
  step = min(info.maxexp - 1, -info.minexp)
  e = jnp.clip(exponent, -3 * step, 3 * step)
  first = jnp.clip(e, -step, step)
  second = jnp.clip(e - first, -step, step)
  return (x * pow2(first, x.dtype) * pow2(second, x.dtype)
          * pow2(e - first - second, x.dtype))


@jax.jit
def frexp_exponent(x: jax.Array) -> jax.Array:
  """The exponent of ``jnp.frexp(x)`` (int32): ``|x| * 2**-e`` is in
  ``[0.5, 1)``, subnormal ``x`` included; 0 where ``x`` is zero or not
  finite. Read from the bits (see :func:`pow2`).

  >>> import jax.numpy as jnp
  >>> frexp_exponent(jnp.array([0.75, 1.0, 2.0**-100, 0.0]))
  Array([  0,   1, -99,   0], dtype=int32)
  """
  info = jnp.finfo(x.dtype)
  bits = jnp.dtype(f'int{info.bits}')
  tiny = jnp.abs(x) < info.smallest_normal
  y = jnp.where(tiny, x * 2.0 ** (info.nmant + 1), x)
  biased = jax.lax.shift_right_logical(
      jax.lax.bitcast_convert_type(y, bits),
      jnp.asarray(info.nmant, bits)) & ((1 << info.nexp) - 1)
  e = biased.astype(jnp.int32) - (info.maxexp - 2) - jnp.where(
      tiny, info.nmant + 1, 0)
  # A biased exponent of 0 is a zero (or a subnormal flushed by the
  # platform), all ones an infinity or NaN.
  return jnp.where((biased > 0) & (biased < (1 << info.nexp) - 1), e, 0)


def has_tangent(tangent_sq: jax.Array, step_sq: jax.Array) -> jax.Array:
  """Whether a step keeps a tangent part after projection, per unit.

  A step parallel to the weights to within rounding leaves only noise after
  the projection (``tangent_sq`` against the step's ``step_sq``), which the
  normalisation would blow up to a full step in a random direction: such a
  step, and any step of a one-element unit, is a zero rotation.
  """
  return tangent_sq > (8 * jnp.finfo(step_sq.dtype).eps) ** 2 * step_sq


def unit_norm(x: jax.Array, spec: LayerSpec, axis_name: AxisName) -> jax.Array:
  """Per-unit L2 norm in the accumulation dtype, shaped ``spec.unit_shape``.

  NaN where the unit is not finite.
  """
  x_hat, exponent, finite = normalize_pow2(upcast(x), spec, axis_name)
  norm = ldexp_exact(jnp.sqrt(unit_sum(x_hat * x_hat, spec, axis_name)),
                     exponent)
  return to_units(jnp.where(finite, norm, jnp.nan), spec)


def to_units(x: jax.Array, spec: LayerSpec) -> jax.Array:
  """Drops the kept reduced axes: ``keepdims_shape -> unit_shape``."""
  return x.reshape(spec.unit_shape)


def from_units(x: Any, spec: LayerSpec) -> jax.Array:
  """Broadcastable per-unit value -> ``keepdims_shape``.

  Accepts a scalar, an array of the stack shape (one value per layer) or of
  the unit shape; leading axes align with the leaf's leading axes.
  """
  x = jnp.asarray(x)
  unit_shape = spec.unit_shape
  if x.shape != unit_shape[: x.ndim]:
    raise ValueError(
        f'Per-unit value for {spec.path!r} has shape {x.shape}; expected a '
        f'scalar, the stack shape {spec.stack_shape} or the unit shape '
        f'{unit_shape}.')
  x = x.reshape(x.shape + (1,) * (len(unit_shape) - x.ndim))
  x = jnp.broadcast_to(x, unit_shape)
  return x.reshape(spec.keepdims_shape)


def concrete_or_none(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy array when its value is known here, else None.

  None for tracers and for arrays spread over processes.
  """
  if isinstance(x, jax.core.Tracer):
    return None  # Under jit/eval_shape even `is_fully_addressable` raises.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None
