"""Rotational equilibrium: the per-step angle a weight-decayed optimizer
settles into, and the Layca rate that turns by that angle every step.

With weight decay, the norm of a scale-invariant weight (one followed by a
normalisation, so that only its direction matters) stops changing once the
decay's shrinking balances the update's growth; from then on every step turns
the weight by an angle fixed by the hyperparameters alone. Kosson, Messmer &
Jaggi derive it for AdamW, SGD with momentum and Lion (*Rotational
Equilibrium: How Weight Decay Balances Learning Across Neural Networks*,
ICML 2024, arXiv 2305.17212); for SGD also Wan et al. (*Spherical Motion
Dynamics*, arXiv 2006.08419). Layca turns each layer by ``atan(rate)`` a
step, so ``rate = tan(angle)`` reproduces that rotation from the first step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Rate = float | optax.Schedule


class _Recipe(NamedTuple):
  """``angle ** 2 = coefficient(**hyper) * learning_rate * weight_decay``."""

  defaults: dict[str, float]
  coefficient: Callable[..., float]


def _adamw(b1: float) -> float:
  return 2.0 * (1.0 - b1) / (1.0 + b1)


def _sgd(momentum: float) -> float:
  return 2.0 / (1.0 + momentum)


def _lion(b1: float, b2: float) -> float:
  # (sqrt(pi / 2) * sqrt(2) * sqrt(k)) ** 2 = pi * k.
  return math.pi * ((1.0 - b1) ** 2 + b1 ** 2 * (1.0 - b2) / (1.0 + b2))


_RECIPES = {
    'adamw': _Recipe({'b1': 0.9}, _adamw),
    'sgd': _Recipe({'momentum': 0.0}, _sgd),
    'lion': _Recipe({'b1': 0.9, 'b2': 0.99}, _lion),
}

_ADAM_L2 = (
    "Adam with L2 regularisation (the decay added to the gradient before "
    "Adam's normalisation: torch.optim.Adam(weight_decay=...), "
    "optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))) has no "
    "closed-form rotational equilibrium: the decay term is divided by Adam's "
    "second-moment estimate together with the gradient, so the balance "
    "between decay and update, and with it the equilibrium angle, depends on "
    "each coordinate's gradient magnitude and differs between layers and "
    "neurons (Kosson et al. 2024, arXiv 2305.17212). Use the decoupled form "
    "('adamw', as optax.adamw and torch.optim.AdamW), or measure the angle "
    "your run settles into with lx.step_rotation.")
_REFUSED = {'adam': _ADAM_L2, 'adam_l2': _ADAM_L2, 'adam+l2': _ADAM_L2}


def _number(value: Any, name: str) -> float | None:
  """``value`` as a float; None for a traced value. TypeError otherwise."""
  if isinstance(value, (bool, jnp.bool_)) or (
      hasattr(value, 'dtype') and jnp.issubdtype(value.dtype, jnp.bool_)):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Real) or (
      hasattr(value, 'dtype') and getattr(value, 'shape', None) == ()):
    return float(value)
  raise TypeError(f'{name} must be a real number, got {value!r} '
                  f'({type(value).__name__}).')


def _coefficient(optimizer: Any, hyper: dict[str, Any]) -> float:
  """Checks the recipe and returns its coefficient (float64)."""
  if not isinstance(optimizer, str):
    raise TypeError(
        f'optimizer must be a name (one of {sorted(_RECIPES)}), got '
        f'{optimizer!r}.')
  key = optimizer.strip().lower()
  if key in _REFUSED:
    raise ValueError(_REFUSED[key])
  if key not in _RECIPES:
    raise ValueError(
        f'No rotational equilibrium is known for optimizer {optimizer!r}; '
        f'known: {sorted(_RECIPES)} (Adam with L2 regularisation has none).')
  recipe = _RECIPES[key]
  given = {k: v for k, v in hyper.items() if v is not None}
  extra = sorted(set(given) - set(recipe.defaults))
  if extra:
    raise TypeError(
        f"The {key!r} equilibrium takes {sorted(recipe.defaults)}, not "
        f'{extra}.')
  values = {}
  for name, default in recipe.defaults.items():
    value = _number(given.get(name, default), name)
    if value is None:
      raise TypeError(f'{name} must be a concrete number, not a traced value.')
    if not 0.0 <= value < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {value!r}.')
    values[name] = value
  return recipe.coefficient(**values)


def _check_weight_decay(weight_decay: Any) -> float:
  value = _number(weight_decay, 'weight_decay')
  if value is None:
    raise TypeError('weight_decay must be a concrete number, not a traced '
                    'value.')
  if not math.isfinite(value) or value <= 0.0:
    raise ValueError(
        f'weight_decay must be a positive, finite number, got '
        f'{weight_decay!r}: without weight decay there is no rotational '
        f'equilibrium (the norm grows without bound and the per-step angle '
        f'keeps shrinking).')
  return value


def _angle(coefficient: float, learning_rate: float, weight_decay: float,
           of_angle: Callable[[float], float]) -> float:
  if not math.isfinite(learning_rate) or learning_rate < 0.0:
    raise ValueError(f'learning_rate must be a finite, non-negative number, '
                     f'got {learning_rate!r}.')
  angle = math.sqrt(coefficient * learning_rate * weight_decay)
  if angle >= math.pi / 2:
    raise ValueError(
        f'The predicted angle, {angle:.3g} rad a step, is not below pi/2: '
        f'learning_rate * weight_decay = {learning_rate * weight_decay:.3g} is '
        f'far outside the small-step regime the equilibrium assumes.')
  return of_angle(angle)


def _equilibrium(optimizer, learning_rate, weight_decay, hyper, of_angle,
                 of_angle_jnp):
  coefficient = _coefficient(optimizer, hyper)
  weight_decay = _check_weight_decay(weight_decay)
  scale = coefficient * weight_decay
  if callable(learning_rate):
    def schedule(count):
      return of_angle_jnp(jnp.sqrt(scale * jnp.asarray(learning_rate(count))))
    return schedule
  value = _number(learning_rate, 'learning_rate')
  if value is None:  # Traced (inside jit or vmap): the same formula in jnp.
    return of_angle_jnp(jnp.sqrt(scale * learning_rate))
  return _angle(coefficient, value, weight_decay, of_angle)


_ARGS_DOC = """
  Args:
    optimizer: ``'adamw'`` (decoupled weight decay multiplied by the learning
      rate, as ``optax.adamw`` and ``torch.optim.AdamW``: each step scales
      the weights by ``1 - learning_rate * weight_decay``); ``'sgd'`` (SGD
      with momentum and the decay added to the gradient before the momentum,
      as ``torch.optim.SGD(weight_decay=...)`` and ``optax.chain(
      optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m))``);
      ``'lion'`` (as ``optax.lion``, Chen et al. 2023: decay multiplied by
      the learning rate). ``'adam'`` (Adam with L2) is refused: it has no
      closed form.
    learning_rate: the optimizer's learning rate: a number, or an optax
      schedule (then a schedule is returned, evaluated at ``learning_rate(
      count)``: the angle follows ``sqrt(learning_rate(count))``).
    weight_decay: the optimizer's weight decay, positive.
    b1: ``'adamw'`` and ``'lion'`` only: the first-moment decay (0.9, optax's
      default, when omitted).
    b2: ``'lion'`` only: the decay of Lion's momentum (0.99, optax's default,
      when omitted).
    momentum: ``'sgd'`` only: the momentum (0 when omitted).

"""

_ASSUMPTIONS_DOC = """
  Formulas (``lr`` the learning rate, ``wd`` the weight decay), from
  Kosson, Messmer & Jaggi, *Rotational Equilibrium: How Weight Decay
  Balances Learning Across Neural Networks* (ICML 2024, arXiv 2305.17212),
  and, for SGD, Wan et al., *Spherical Motion Dynamics* (arXiv 2006.08419):

  * AdamW: ``sqrt(2 lr wd (1 - b1) / (1 + b1))``;
  * SGD, momentum ``m``: ``sqrt(2 lr wd / (1 + m))``;
  * Lion: ``sqrt(pi / 2) sqrt(2 lr wd) sqrt((1 - b1)**2 + b1**2 (1 - b2) /
    (1 + b2))``.

  Assumptions (the prediction is only as good as they are):

  * the weight is scale-invariant: a normalisation (LayerNorm, BatchNorm,
    ...) follows it, so its gradient is orthogonal to it and shrinks as
    ``1 / |w|``. LayerNorm makes a whole layer invariant, BatchNorm each
    output channel; the expected angle is the same for either unit. Output
    layers, embeddings feeding a residual stream and attention query/key
    kernels are not scale-invariant;
  * random-walk regime: successive gradients (for AdamW, Adam-normalised
    gradients; for Lion, the momenta) are uncorrelated across steps, so the
    update's noise, not a consistent drift, sets the norm;
  * equilibrium has been reached: the norm relaxes towards it with a time
    constant of about ``1 / (2 lr wd)`` steps for AdamW and Lion, and
    ``(1 - m) / (4 lr wd)`` steps for SGD; before that the angle depends on
    the initial norm. With a schedule the value at ``count`` is the
    equilibrium for ``learning_rate(count)``; real weights lag behind it
    where the learning rate changes faster than that time constant (warm-up,
    the end of a decay);
  * small steps (``lr wd << 1``, angle ``<< 1``), many weights per unit, and
    Adam's ``eps`` negligible against the gradients' scale;
  * Lion: ``sign`` is linearised for a Gaussian momentum, and the momentum's
    memory ``1 / (1 - b2)`` is short next to the relaxation time. In a
    float64 random walk (``tests/test_equilibrium.py``) the formula is within
    1% at ``b1 = 0.9, b2 = 0.99, lr wd = 5e-4``, but the simulated angle is
    about 6% below it at ``b1 = 0.5`` and 4-5% below it when
    ``lr wd / (1 - b2) = 0.05``.

  Measured on a real network (``examples/study_equilibrium.py``: an MLP
  whose hidden kernels are followed by LayerNorm), SGD's formula held on
  every scale-invariant layer (within 14%, ReLU or tanh); AdamW's within 7%
  with ReLU but up to 53% high with tanh; Lion's on the first layer only.
  Elementwise normalisation (Adam) and ``sign`` (Lion) do not keep the
  direction orthogonal to the weights, so the random-walk assumption is the
  weak point for them: measure with ``lx.step_rotation`` where it matters.
"""


def _document(fn):
  fn.__doc__ = fn.__doc__.replace('  {args}\n', _ARGS_DOC).replace(
      '  {assumptions}\n', _ASSUMPTIONS_DOC)
  return fn


@_document
def equilibrium_angle(
    optimizer: str,
    learning_rate: Rate,
    weight_decay: float,
    *,
    b1: float | None = None,
    b2: float | None = None,
    momentum: float | None = None,
) -> Rate:
  """The per-step angle (radians) of a scale-invariant weight in rotational
  equilibrium under ``optimizer`` with weight decay.
  {assumptions}
  {args}
  Returns:
    The expected angle in radians per step: a float (computed in float64)
    for a number, a schedule (jnp, float32) for a schedule.

  Raises:
    ValueError: for Adam with L2 (no closed form), an unknown optimizer, a
      non-positive weight decay, a negative learning rate, a momentum or
      ``b1``/``b2`` outside ``[0, 1)``, or a predicted angle of ``pi/2`` or
      more.
    TypeError: for a non-numeric argument, or a hyperparameter the named
      optimizer does not have (e.g. ``momentum`` for ``'adamw'``).

  Example:
    >>> import layca_jax as lx
    >>> round(lx.equilibrium_angle('adamw', 1e-3, 0.1), 6)  # b1 = 0.9
    0.003244
    >>> round(lx.equilibrium_angle('sgd', 0.1, 5e-4, momentum=0.9), 6)
    0.007255
    >>> round(lx.equilibrium_angle('lion', 1e-4, 1.0), 6)  # b1 0.9, b2 0.99
    0.002102
  """
  return _equilibrium(optimizer, learning_rate, weight_decay,
                      {'b1': b1, 'b2': b2, 'momentum': momentum},
                      lambda angle: angle, lambda angle: angle)


@_document
def equilibrium_rate(
    optimizer: str,
    learning_rate: Rate,
    weight_decay: float,
    *,
    b1: float | None = None,
    b2: float | None = None,
    momentum: float | None = None,
) -> Rate:
  """The Layca rate that turns each layer by the equilibrium angle of
  ``optimizer`` every step: ``tan(equilibrium_angle(...))``.

  Layca turns each layer by ``atan(rate)`` a step from the first step on, so
  this rate gives the rotation a well-tuned weight-decayed recipe settles
  into, without its transient and for every layer alike, scale-invariant or
  not. Pass a learning-rate schedule to get a rate schedule of the same
  shape (the angle follows ``sqrt(learning_rate(count))``).
  {assumptions}
  {args}
  Returns:
    The Layca rate: a float (computed in float64) for a number, an optax
    schedule for a schedule, ready for ``lx.layca_adam(rate)`` or
    ``optax.scale_by_learning_rate(rate)`` in a chain.

  Raises:
    ValueError: as :func:`equilibrium_angle` (Adam with L2 included).
    TypeError: as :func:`equilibrium_angle`.

  Example:
    >>> import math, optax
    >>> import layca_jax as lx
    >>> rate = lx.equilibrium_rate('adamw', 1e-3, 0.1)
    >>> round(math.atan(rate), 6)  # turns by the AdamW equilibrium angle
    0.003244
    >>> schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000)
    >>> rates = lx.equilibrium_rate('adamw', schedule, 0.1)
    >>> round(float(rates(100)), 6), round(float(rates(50)), 6)
    (0.003244, 0.002294)
    >>> tx = lx.layca_adam(rates)  # AdamW's equilibrium rotation, as Layca
  """
  return _equilibrium(optimizer, learning_rate, weight_decay,
                      {'b1': b1, 'b2': b2, 'momentum': momentum}, math.tan,
                      jnp.tan)
