"""The paper's Layca optimizers: a base direction, then Layca at rate ``rho``.

Each equals the chain ``base, layca(), scale_by_learning_rate(rho),
keep_norm()`` on layer leaves, computed as one fused transformation
(:mod:`layca_jax._fused`: closed form per unit, one reduction pass and one
elementwise pass). Non-layer leaves (biases, normalisation parameters) are
frozen, as in the paper, unless ``non_layer_learning_rate`` is given: they
then follow the base direction at that rate.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from layca_jax import _fused
from layca_jax._layers import PerLeaf, UnitOptions, document_options

Rate = float | optax.Schedule


def check_rate(rate: Any, name: str) -> None:
  """ValueError for a negative, NaN or infinite float rate (schedules pass)."""
  if callable(rate) or rate is None:
    return
  try:
    value = float(rate)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # A traced rate: its value is not known here.
  if not math.isfinite(value) or value < 0:
    raise ValueError(
        f'{name} must be a finite, non-negative number, got {rate!r}.')


def _layca_optimizer(base: optax.GradientTransformation, learning_rate: Rate,
                     non_layer_learning_rate: Rate | None, mask, per_neuron,
                     stack_axes, multipliers, axis_name, *,
                     base_has_state: bool = True):
  check_rate(learning_rate, 'learning_rate')
  check_rate(non_layer_learning_rate, 'non_layer_learning_rate')
  options = UnitOptions(mask, per_neuron, stack_axes, axis_name)
  return _fused.fused_layca(base, learning_rate, non_layer_learning_rate,
                            options, multipliers, base_has_state=base_has_state)


_with_options_doc = document_options(
    'non_layer_learning_rate', 'mask', 'per_neuron', 'stack_axes',
    'multipliers', 'axis_name')


@_with_options_doc
def layca_sgd(
    learning_rate: Rate,
    momentum: float = 0.0,
    nesterov: bool = False,
    *,
    non_layer_learning_rate: Rate | None = None,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    multipliers: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """SGD + Layca: each layer turns by ``atan(learning_rate)`` per step.

  ``optax.trace(momentum, nesterov)`` gives the direction (the gradient
  itself when ``momentum == 0``), then Layca projects it on the tangent
  space of each layer's sphere, scales it to the layer's norm, steps by
  ``learning_rate`` and returns to the initial norm. The paper's rates, with
  step decays: ``3 ** -3`` for plain SGD, ``3 ** -5`` with momentum 0.9 (the
  authors' ``SGD_AMom_layca``, whose direction is this one's): momentum
  keeps a layer turning along its old direction for ~``1 / (1 - momentum)``
  steps after the gradient changes (at ``3 ** -3`` a per-layer run on the
  digits did not train, ``benchmarks/README.md``).

  Args:
    learning_rate: the rotation rate ``rho`` (float or optax schedule).
    momentum: momentum of the base direction (0 for plain SGD).
    nesterov: Nesterov momentum.
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 2.], [3., 4.]]), 'bias': jnp.ones(2)}
    >>> loss = lambda p: jnp.sum(p['kernel'] ** 3) + jnp.sum(p['bias'])
    >>> tx = lx.layca_sgd(3.0 ** -5, momentum=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> round(float(lx.step_rotation(params, new)['kernel']), 5)  # atan(1/243)
    0.00412
    >>> bool(jnp.all(new['bias'] == params['bias']))  # frozen by default
    True
  """
  # Decided on the Python value, never on an array's: under
  # optax.inject_hyperparams momentum arrives as an array (traced in update),
  # and init and update must build the same base.
  plain = isinstance(momentum, (int, float)) and momentum == 0 and not nesterov
  base = optax.identity() if plain else optax.trace(decay=momentum,
                                                    nesterov=nesterov)
  return _layca_optimizer(base, learning_rate, non_layer_learning_rate, mask,
                          per_neuron, stack_axes, multipliers, axis_name,
                          base_has_state=not plain)


@_with_options_doc
def layca_adam(
    learning_rate: Rate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    nesterov: bool = False,
    *,
    non_layer_learning_rate: Rate | None = None,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    multipliers: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """Adam + Layca: Adam's direction, each layer turning by ``atan(rho)``.

  ``optax.scale_by_adam`` gives the direction, then Layca as in
  :func:`layca_sgd`. The paper's default rate is ``3 ** -5``.

  Args:
    learning_rate: the rotation rate ``rho`` (float or optax schedule).
    b1, b2, eps, eps_root, nesterov: as in ``optax.scale_by_adam`` (optax's
      defaults; ``nesterov=True`` is NAdam's direction).
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 2.], [3., 4.]])}
    >>> tx = lx.layca_adam(3.0 ** -5)
    >>> state = tx.init(params)
    >>> grads = {'kernel': jnp.array([[0.1, -2.], [0.3, 1.]])}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(jnp.isclose(jnp.linalg.norm(new['kernel']), jnp.sqrt(30.)))
    True
  """
  return _layca_optimizer(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                          nesterov=nesterov),
      learning_rate, non_layer_learning_rate, mask, per_neuron, stack_axes,
      multipliers, axis_name)


@_with_options_doc
def layca_rmsprop(
    learning_rate: Rate,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    non_layer_learning_rate: Rate | None = None,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    multipliers: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """RMSprop + Layca: ``optax.scale_by_rms`` direction, then Layca.

  Args:
    learning_rate: the rotation rate ``rho`` (float or optax schedule).
    decay, eps, initial_scale, eps_in_sqrt, bias_correction: as in
      ``optax.scale_by_rms`` (optax's defaults; Keras puts ``eps`` outside
      the root: ``eps_in_sqrt=False``).
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = lx.layca_rmsprop(0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'kernel': jnp.ones((2, 2))}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> round(float(lx.step_rotation(params, new)['kernel']), 5)  # atan(0.1)
    0.09967
  """
  return _layca_optimizer(
      optax.scale_by_rms(decay=decay, eps=eps, initial_scale=initial_scale,
                         eps_in_sqrt=eps_in_sqrt,
                         bias_correction=bias_correction), learning_rate,
      non_layer_learning_rate, mask, per_neuron, stack_axes, multipliers,
      axis_name)


@_with_options_doc
def layca_adagrad(
    learning_rate: Rate,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    non_layer_learning_rate: Rate | None = None,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    multipliers: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """Adagrad + Layca: ``optax.scale_by_rss`` direction, then Layca.

  Args:
    learning_rate: the rotation rate ``rho`` (float or optax schedule).
    initial_accumulator_value, eps: as in ``optax.scale_by_rss`` (Keras
      starts the accumulator at 0: ``initial_accumulator_value=0.0``).
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = lx.layca_adagrad(0.1)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'kernel': jnp.ones((2, 2))}, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> round(float(lx.step_rotation(params, new)['kernel']), 5)
    0.09967
  """
  return _layca_optimizer(
      optax.scale_by_rss(initial_accumulator_value=initial_accumulator_value,
                         eps=eps), learning_rate, non_layer_learning_rate,
      mask, per_neuron, stack_axes, multipliers, axis_name)
