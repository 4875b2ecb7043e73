"""Layer rotation: how far each layer turned, since init or in one step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layca_jax import _layers
from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec, PerLeaf, PyTree, UnitOptions


def _chord(spec: LayerSpec, a: jax.Array, b: jax.Array, axis_name) -> jax.Array:
  """Per-unit distance between ``a/|a|`` and ``b/|b|`` (NaN for a zero unit).

  Measured directly rather than from ``<a,b>``: ``1 - cos`` loses all its
  digits in float32 when the angle is small, ``|a/|a| - b/|b||`` does not.
  """
  a_hat, _, a_ok = nx.normalize_pow2(nx.upcast(a), spec, axis_name)
  b_hat, _, b_ok = nx.normalize_pow2(nx.upcast(b), spec, axis_name)
  aa = nx.unit_sum(a_hat * a_hat, spec, axis_name)
  bb = nx.unit_sum(b_hat * b_hat, spec, axis_name)
  ok = a_ok & b_ok & (aa > 0) & (bb > 0)
  diff = (a_hat * jax.lax.rsqrt(jnp.where(ok, aa, 1.0))
          - b_hat * jax.lax.rsqrt(jnp.where(ok, bb, 1.0)))
  chord = jnp.sqrt(nx.unit_sum(diff * diff, spec, axis_name))
  return nx.to_units(jnp.where(ok, jnp.minimum(chord, 2.0), jnp.nan),
                     spec).astype(jnp.float32)


def _per_unit(measure, params: PyTree, reference: PyTree, what: str,
              options: UnitOptions) -> PyTree:
  _layers.check_same_structure(params, reference, what)
  specs = options.specs(params)
  leaves, treedef = jax.tree.flatten(params)
  return _layers.map_layers(
      lambda spec, w, w0, axis: measure(_chord(spec, w, w0, axis)),
      specs, treedef, leaves, treedef.flatten_up_to(reference),
      options.axis_names(params), other=lambda *_: None)


def cosine_distance_from_chord(chord: jax.Array) -> jax.Array:
  return 0.5 * chord * chord


def angle_from_chord(chord: jax.Array) -> jax.Array:
  return 2.0 * jnp.arcsin(0.5 * chord)


def layer_rotation(
    params: PyTree,
    init_params: PyTree,
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = 0,
    axis_name: PerLeaf = None,
) -> PyTree:
  """Each layer's rotation: cosine distance between its weights and init.

  ``1 - <w, w0> / (|w| |w0|)`` per rotation unit, weights flattened, in
  ``[0, 2]``: 0 is no rotation, 1 is orthogonal (the paper's optimum).
  Accumulated in float32 whatever the params' dtype; NaN for a unit whose
  weights (now or at init) are zero or not finite. Pure and jit-able; with
  sharded params it gives the unsharded answer.

  Args:
    params: current params.
    init_params: params at initialisation, same structure and shapes.
    mask: which leaves are layers (see :func:`layca`).
    per_neuron: one value per output channel (last axis).
    stack_axes: leading axes indexing independent layers: one value each.
    axis_name: mesh axis a layer is split over inside ``shard_map``/``pmap``.

  Returns:
    A pytree like ``params``: a float32 array of the unit shape (a scalar
    for a whole layer) at layer leaves, ``None`` at the others.

  Raises:
    ValueError: if the two pytrees differ in structure or shape (naming the
      paths).

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> w0 = {'kernel': jnp.array([[1., 0.], [0., 0.]]), 'bias': jnp.zeros(2)}
    >>> w = {'kernel': jnp.array([[0., 1.], [0., 0.]]), 'bias': jnp.ones(2)}
    >>> rotation = lx.layer_rotation(w, w0)
    >>> rotation['bias'] is None, round(float(rotation['kernel']), 6)
    (True, 1.0)
  """
  return _per_unit(cosine_distance_from_chord, params, init_params,
                   'init_params',
                   UnitOptions(mask, per_neuron, stack_axes, axis_name))


def step_rotation(
    before: PyTree,
    after: PyTree,
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = 0,
    axis_name: PerLeaf = None,
) -> PyTree:
  """The angle, in radians, each layer turned between two sets of params.

  The paper's per-step rotation: pass the params before and after one step.
  Accurate for small angles (measured from the chord between the unit
  directions, not from an arccos). Options as in :func:`layer_rotation`.

  Returns:
    A pytree like ``before``: float32 angles in ``[0, pi]`` per unit at layer
    leaves (NaN for a zero unit), ``None`` elsewhere.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> before = {'kernel': jnp.array([[1., 0.], [0., 0.]])}
    >>> after = {'kernel': jnp.array([[1., 1.], [0., 0.]])}
    >>> round(float(lx.step_rotation(before, after)['kernel']), 6)  # pi / 4
    0.785398
  """
  return _per_unit(angle_from_chord, after, before, 'before',
                   UnitOptions(mask, per_neuron, stack_axes, axis_name))
