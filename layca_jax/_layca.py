"""Layca's two links: ``layca`` (Algorithm 1, steps 1-2) and ``keep_norm`` (step 4).

Algorithm 1 of Carbonnelle & De Vleeschouwer (2019), for each layer ``w``
with a step ``s`` proposed by a base optimizer:

1. ``s <- s - (<s, w> / <w, w>) w``   (project on the sphere's tangent space)
2. ``s <- s * |w| / |s|``             (rotation-based normalisation)
3. ``w <- w - rho * s``               (any optax scaling link, e.g. ``sgd``)
4. ``w <- w * |w(0)| / |w|``          (back on the initial sphere)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layca_jax import _closed_form as cf
from layca_jax import _layers
from layca_jax import _numerics as nx
from layca_jax._layers import PerLeaf, PyTree, UnitOptions
from layca_jax._rotation import copy_params


def _unit_norms(params: PyTree, specs, axis_names) -> list[jax.Array | None]:
  """Per-unit norms of each layer leaf, None at the others."""
  return [nx.unit_norm(x, spec, axis) if spec is not None else None
          for spec, x, axis in zip(specs, jax.tree.leaves(params), axis_names)]


def _check_finite_norms(norms: list[jax.Array | None], specs) -> None:
  """ValueError naming the layer if a concrete norm is not finite.

  A zero norm is fine: such units are free (see :func:`free_units`).
  """
  for spec, norm in zip(specs, norms):
    if spec is None:
      continue
    value = nx.concrete_or_none(norm)
    if value is None or np.all(np.isfinite(value)):
      continue
    where = '' if value.ndim == 0 else (
        f' at unit indices {np.argwhere(~np.isfinite(value))[:5].tolist()}')
    raise ValueError(
        f'Layer {spec.path!r} has a norm that is not finite in float32 (NaN '
        f'or Inf values, or a norm beyond the float32 range){where}: such a '
        f'layer cannot rotate. Initialise it with finite values or exclude '
        f'it with `mask`.')


def initial_norms(params: PyTree, specs, axis_names) -> list[jax.Array | None]:
  """Per-unit norms at ``init``, checked (see :func:`_check_finite_norms`)."""
  norms = _unit_norms(params, specs, axis_names)
  _check_finite_norms(norms, specs)
  return norms


def check_state_fits(params: PyTree, specs, initial_norm: PyTree,
                     name: str) -> None:
  """ValueError naming the leaf where params no longer fit a per-unit state.

  ``initial_norm`` (``None`` at non-layer leaves) was made by ``init`` from
  the params: the same leaves must still be layers, with the same units.
  """
  _layers.check_same_structure(params, initial_norm,
                               f'The state made by {name}.init',
                               none_is_leaf=True)
  norms = jax.tree.structure(params).flatten_up_to(initial_norm)
  for spec, norm, path in zip(specs, norms, _layers.leaf_paths(params)):
    if (spec is None) != (norm is None):
      now, then = (('a layer', 'were not') if norm is None
                   else ('not a layer', 'were'))
      raise ValueError(
          f'Params at {path!r} are {now} now but {then} at {name}.init: the '
          f'params changed dtype, shape or mask since init.')
    if spec is not None and tuple(np.shape(norm)) != spec.unit_shape:
      raise ValueError(
          f'Params at {path!r} have {spec.unit_shape} rotation units (shape '
          f'{spec.shape}), but {name}.init saw {np.shape(norm)}: the params '
          f'changed shape or unit options since init.')


def _require_params(params: PyTree | None, name: str) -> None:
  if params is None:
    raise ValueError(
        f'{name}.update needs the current params: call '
        f'`tx.update(updates, state, params)` (as `nnx.Optimizer` and '
        f'`optax.apply_updates` loops do).')


def check_update_inputs(name: str, updates: PyTree, params: PyTree | None,
                        specs_of, initial_norm: PyTree) -> list[Any]:
  """Every check an ``update`` of a Layca transform makes on its inputs.

  Params must be given; updates must fit them (see
  :func:`layca_jax._layers.check_updates`); params must still fit the
  per-unit state made at ``init``. Only shapes and dtypes are read, so the
  checks cost nothing inside ``jit`` after tracing.

  Args:
    name: the transform's name, for messages.
    updates: the incoming updates.
    params: the params passed to ``update``.
    specs_of: ``UnitOptions.specs`` (a callable of params).
    initial_norm: the state's per-unit initial norms.

  Returns:
    The layer specs of ``params``.
  """
  _require_params(params, name)
  _layers.check_updates(params, updates)
  specs = specs_of(params)
  check_state_fits(params, specs, initial_norm, name)
  return specs


def multiplier_values(multipliers: PerLeaf, params: PyTree, specs,
                      count: jax.Array) -> list[jax.Array | None]:
  """Per-leaf multipliers at step ``count``, shaped ``keepdims_shape`` (None
  at non-layers), floating (float32 unless given wider).

  A callable ``multipliers`` is a function of the params; a callable *leaf*
  is a schedule, called with the step ``count`` (e.g. from
  :func:`layca_jax.replay_multipliers`). Concrete values are checked: a
  negative or NaN multiplier is a ValueError naming its leaf.
  """
  if multipliers is None:
    return [None] * len(specs)
  if callable(multipliers):  # Of the params; schedules sit at the leaves.
    multipliers = multipliers(params)
  values = _layers.broadcast_option(
      multipliers, params, 'multipliers',
      lambda x: x is None or isinstance(x, (int, float)) or callable(x) or (
          hasattr(x, 'shape') and hasattr(x, 'dtype')))
  out = []
  for spec, m in zip(specs, values):
    if spec is None or m is None:
      out.append(None)
      continue
    if callable(m):
      m = m(count)
    concrete = nx.concrete_or_none(m)
    if concrete is not None and not np.all(np.isfinite(concrete)
                                           & (concrete >= 0)):
      raise ValueError(
          f'Multiplier for {spec.path!r} must be finite and >= 0, got '
          f'{concrete}.')
    m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.floating):
      m = m.astype(jnp.float32)
    out.append(nx.from_units(m, spec))
  return out


def unit_values(per_unit: PyTree, specs, treedef) -> list[Any]:
  """A state's per-unit tree as per-leaf ``keepdims_shape`` arrays."""
  return [v if spec is None else nx.from_units(v, spec)
          for v, spec in zip(treedef.flatten_up_to(per_unit), specs)]


# ---------------------------------------------------------------------------
# layca: steps 1-2.


class LaycaState(NamedTuple):
  """State of :func:`layca`.

  Attributes:
    initial_norm: per-unit norms of the params at ``init`` (float32, or the
      params' dtype where wider); zero for free units (:func:`free_units`).
    norm: per-unit norms seen at the last ``update``; with
      :func:`norm_drift`, tells whether something holds the norm.
    skipped: per-unit count of steps whose incoming update held a NaN or
      Inf (those units got a zero step; see :func:`skipped_steps`).
    count: number of ``update`` calls (int32): the step at which schedules
      in ``multipliers`` are read.
  """

  initial_norm: PyTree
  norm: PyTree
  skipped: PyTree
  count: jax.Array


def next_state(state: LaycaState, coefs, specs, treedef) -> LaycaState:
  """The state after a step: norms seen, skipped units counted (dtypes kept)."""
  n0s = treedef.flatten_up_to(state.initial_norm)
  norm = [None if c is None else nx.to_units(c.norm, spec).astype(n0.dtype)
          for c, spec, n0 in zip(coefs, specs, n0s)]
  finite = [None if c is None else nx.to_units(c.finite, spec)
            for c, spec in zip(coefs, specs)]
  skipped = jax.tree.map(lambda count, ok: count + (~ok).astype(jnp.int32),
                         state.skipped, treedef.unflatten(finite))
  return LaycaState(state.initial_norm, treedef.unflatten(norm), skipped,
                    optax.safe_increment(state.count))


@_layers.document_options('mask', 'per_neuron', 'stack_axes', 'multipliers',
                          'axis_name')
def layca(
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    multipliers: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """Layca's steps 1-2: turn each layer's step into a rotation of the layer.

  For every layer unit ``w`` with incoming step ``s`` (a gradient, or the
  direction of a base optimizer placed before this link), the output is
  ``s`` projected on the tangent space of the sphere through ``w`` and
  rescaled to ``|w|`` (times the unit's multiplier). Scaling it by ``rho``
  turns the layer by ``atan(rho)``; a zero step stays zero. Non-layer leaves
  pass through unchanged. A unit whose step holds NaN or Inf gets a zero step
  (its weights stay) and the state counts it. A unit that is zero at
  ``init`` (a zero-initialised head, a LoRA ``B``) has no direction to
  rotate: it is *free*, its step passes through (times its multiplier), so
  the rest of the chain trains it as the base optimizer would
  (:func:`free_units`).

  Alone this link does not hold the norm (each step grows it by
  ``sqrt(1 + rho^2)``): end the chain with :func:`keep_norm`.

  Inputs are checked, with errors naming the leaf path: ``update`` needs
  ``params``; updates must match them in structure and shape and be floating
  where they are (float32 updates for bfloat16 params are fine); params must
  still have the layers seen at ``init``, where a layer with NaN/Inf values,
  a negative, NaN or Inf multiplier and a unit option that does not fit its
  leaf are errors. An empty pytree is a no-op.

  Args:
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 0.], [0., 1.]]), 'bias': jnp.ones(2)}
    >>> tx = optax.chain(lx.layca(), optax.sgd(0.1), lx.keep_norm())
    >>> state = tx.init(params)
    >>> grads = {'kernel': jnp.array([[0., 1.], [1., 0.]]), 'bias': jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> angle = lx.step_rotation(params, new)['kernel']
    >>> bool(jnp.isclose(angle, jnp.arctan(0.1)))
    True
  """
  options = UnitOptions(mask, per_neuron, stack_axes, axis_name)

  def init_fn(params):
    specs = options.specs(params)
    count = jnp.zeros([], jnp.int32)
    multiplier_values(multipliers, params, specs, count)  # Validates early.
    norms = initial_norms(params, specs, options.axis_names(params))
    treedef = jax.tree.structure(params)
    # zeros_like keeps the norms' shard_map varying-ness, which update's
    # counts have: a lax.scan carrying the state needs both to match.
    skipped = [n if n is None else jnp.zeros_like(n, jnp.int32) for n in norms]
    return LaycaState(initial_norm=treedef.unflatten(norms),
                      norm=copy_params(treedef.unflatten(norms)),
                      skipped=treedef.unflatten(skipped), count=count)

  def update_fn(updates, state, params=None):
    specs = check_update_inputs('layca', updates, params, options.specs,
                                state.initial_norm)
    leaves, treedef = jax.tree.flatten(params)
    steps = treedef.flatten_up_to(updates)
    mults = [jnp.ones((), jnp.float32) if m is None else m
             for m in multiplier_values(multipliers, params, specs,
                                        state.count)]
    coefs = cf.coefficients(cf.LAYCA_STEP, specs, leaves, steps,
                            options.axis_names(params),
                            unit_values(state.initial_norm, specs, treedef),
                            mults)
    new_updates = [s if c is None else cf.apply_coefficients(c, w, s, s.dtype)
                   for c, w, s in zip(coefs, leaves, steps)]
    return treedef.unflatten(new_updates), next_state(state, coefs, specs,
                                                      treedef)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# keep_norm: step 4.


class KeepNormState(NamedTuple):
  """State of :func:`keep_norm`: per-unit norms at ``init`` (float32)."""

  initial_norm: PyTree


@_layers.document_options('mask', 'per_neuron', 'stack_axes', 'axis_name')
def keep_norm(
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """Layca's step 4: land every layer unit back on its initial sphere.

  The last link of a chain: ``init`` stores each unit's norm; ``update``
  returns the update that moves ``params + updates`` radially back to that
  norm, whatever came before. A unit whose ``params + updates`` is not
  finite (or zero), or whose update is zero, keeps its weights exactly; so
  does one of ordinary scale whose update entries are all below ``2**-63``
  (below float32 resolution of the unit). Non-layer leaves pass through, and
  so do the updates of free units (zero at ``init``: no sphere to keep).
  ``optax.chain(optax.adam(lr), lx.keep_norm())`` is Adam on each layer's
  sphere.

  Args:
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[3., 0.], [0., 4.]])}
    >>> tx = optax.chain(optax.sgd(0.5), lx.keep_norm())
    >>> state = tx.init(params)
    >>> grads = {'kernel': -jnp.ones((2, 2))}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> float(jnp.linalg.norm(new['kernel']))
    5.0
  """
  options = UnitOptions(mask, per_neuron, stack_axes, axis_name)

  def init_fn(params):
    specs = options.specs(params)
    norms = initial_norms(params, specs, options.axis_names(params))
    return KeepNormState(jax.tree.structure(params).unflatten(norms))

  def update_fn(updates, state, params=None):
    specs = check_update_inputs('keep_norm', updates, params, options.specs,
                                state.initial_norm)
    leaves, treedef = jax.tree.flatten(params)
    steps = treedef.flatten_up_to(updates)
    coefs = cf.coefficients(cf.BACK_ON_SPHERE, specs, leaves, steps,
                            options.axis_names(params),
                            unit_values(state.initial_norm, specs, treedef))
    out = [u if c is None else cf.apply_coefficients(c, w, u, u.dtype)
           for c, w, u in zip(coefs, leaves, steps)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Reading the states.


def _find_states(state: Any, kind: type) -> list[Any]:
  found = []

  def visit(node):
    if isinstance(node, kind):
      found.append(node)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, '__dict__') and not isinstance(node, jax.Array):
      for child in vars(node).values():
        visit(child)

  visit(state)
  return found


def _the_layca_state(state: Any) -> LaycaState:
  found = _find_states(state, LaycaState)
  if len(found) != 1:
    raise ValueError(
        f'Expected exactly one layca state inside the optimizer state, found '
        f'{len(found)}.')
  return found[0]


def skipped_steps(state: Any) -> PyTree:
  """Per-unit count of steps skipped for a non-finite update.

  Args:
    state: the state of :func:`layca`, of a chain holding it, or of a Layca
      optimizer, at any depth.

  Returns:
    A pytree like the params: int32 counts per unit, None at non-layer leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = lx.layca_sgd(0.1)
    >>> state = tx.init(params)
    >>> _, state = tx.update({'kernel': jnp.full((2, 2), jnp.nan)}, state, params)
    >>> int(lx.skipped_steps(state)['kernel'])
    1
  """
  return _the_layca_state(state).skipped


def norm_drift(state: Any) -> PyTree:
  """Relative change of each unit's norm since ``init``, as seen by layca.

  Zero (to float precision) when the chain ends with :func:`keep_norm`; a
  chain without it drifts by ``sqrt(1 + rho^2)`` per step.

  Args:
    state: a state holding a :func:`layca` state, at any depth.

  Returns:
    ``|w_t| / |w_0| - 1`` per unit (float32), None at non-layer leaves,
    where ``w_t`` are the params given to the last ``update``; NaN for free
    units (:func:`free_units`), which have no sphere to drift from.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = optax.chain(lx.layca(), optax.sgd(1.0))  # no keep_norm
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({'kernel': jnp.ones((2, 2))}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(lx.norm_drift(state)['kernel']), 4)  # one step seen
    0.4142
  """
  s = _the_layca_state(state)
  return jax.tree.map(
      lambda n, n0: jnp.where(n0 > 0, n / jnp.where(n0 > 0, n0, 1.0) - 1.0,
                              jnp.nan), s.norm, s.initial_norm)


def free_units(state: Any) -> PyTree:
  """Which units are free: zero at ``init``, so trained without rotation.

  A unit whose weights are all zero at initialisation (a zero-initialised
  output head, a LoRA ``B`` matrix, an adaLN-zero or ReZero-style gate) has
  no direction to rotate and no sphere to stay on. Every Layca transform
  trains it with the incoming direction instead: the ``layca`` link passes
  its step through (times its multiplier), ``keep_norm`` leaves it alone,
  and the ready-made optimizers step it by ``-learning_rate * multiplier *
  d`` (``d`` the base direction: the gradient for plain SGD, Adam's
  direction for ``layca_adam``). It stays free for the whole run; its
  :func:`layca_jax.layer_rotation` from init is NaN (undefined).

  Args:
    state: the state of :func:`layca`, of a chain holding it, or of a Layca
      optimizer, at any depth.

  Returns:
    A pytree like the params: bool per unit, None at non-layer leaves.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> params = {'head': {'kernel': jnp.zeros((4, 2))}, 'body': {'kernel': jnp.eye(4)}}
    >>> tx = lx.layca_sgd(0.1)
    >>> state = tx.init(params)
    >>> lx.free_units(state)
    {'body': {'kernel': Array(False, dtype=bool)}, 'head': {'kernel': Array(True, dtype=bool)}}
    >>> updates, state = tx.update({'head': {'kernel': jnp.ones((4, 2))},
    ...                             'body': {'kernel': jnp.ones((4, 4))}}, state, params)
    >>> round(float(updates['head']['kernel'][0, 0]), 6)  # -0.1 * gradient
    -0.1
  """
  return jax.tree.map(lambda n0: n0 == 0, _the_layca_state(state).initial_norm)
