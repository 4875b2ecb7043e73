"""Per-unit reductions that accumulate in float32 and never overflow.

Every norm and dot product in layca-jax goes through this module. Values are
first scaled, per unit, by a power of two that brings their largest magnitude
into ``[0.5, 1)``: the scaling is exact, and no finite input can then overflow
or underflow a sum of squares. Sums accumulate in ``float32`` (or wider when
the input is wider), whatever the dtype of the params, and are ``psum``-ed
over ``axis_name`` when a layer is split across devices.
"""

from __future__ import annotations

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
  usable = finite & (peak > 0)
  _, exponent = jnp.frexp(jnp.where(usable, peak, 1.0))
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
  half = exponent // 2
  one = jnp.ones((), x.dtype)
  return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def ldexp_exact(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` without forming ``2**exponent``, for per-unit values.

  Applied in two halves so that neither factor leaves the float range when
  the exponent is near its limits (subnormal or huge peaks).
  """
  half = exponent // 2
  return jnp.ldexp(jnp.ldexp(x, half), exponent - half)


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
