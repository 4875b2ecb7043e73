"""Layer rotation: how far each layer turned, since init or in one step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from layca_jax import _layers
from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec, PerLeaf, PyTree, UnitOptions

# The one-pass result is kept while its estimated rounding error is at most
# this many times the error of a single float32 sum (relative to the result);
# beyond it one more pass measures the chord directly.
_MAX_ERROR_GROWTH = 16.0


def _robust_chord(spec: LayerSpec, a: jax.Array, b: jax.Array,
                  axis_name) -> jax.Array:
  """Per-unit ``|a/|a| - b/|b||`` (NaN for a zero unit), for any finite scale.

  Measured directly rather than from ``<a,b>``: ``1 - cos`` loses all its
  digits in float32 when the angle is small, ``|a/|a| - b/|b||`` does not.
  Three passes (peaks, norms, chord); used only where the one-pass sums of
  :func:`_one_pass` could overflow or underflow.
  """
  a_hat, _, a_ok = nx.normalize_pow2(nx.upcast(a), spec, axis_name)
  b_hat, _, b_ok = nx.normalize_pow2(nx.upcast(b), spec, axis_name)
  aa = nx.unit_sum(a_hat * a_hat, spec, axis_name)
  bb = nx.unit_sum(b_hat * b_hat, spec, axis_name)
  ok = a_ok & b_ok & (aa > 0) & (bb > 0)
  diff = (a_hat * jax.lax.rsqrt(jnp.where(ok, aa, 1.0))
          - b_hat * jax.lax.rsqrt(jnp.where(ok, bb, 1.0)))
  chord = jnp.sqrt(nx.unit_sum(diff * diff, spec, axis_name))
  return jnp.where(ok, jnp.minimum(chord, 2.0), jnp.nan)


class _OnePass(NamedTuple):
  """Per-unit results of one fused reduction pass over ``a`` and ``b``."""

  chord: jax.Array   # keepdims shape; NaN where a unit is zero or not finite.
  norm_a: jax.Array
  norm_b: jax.Array
  level: jax.Array   # scalar: 0 keep, 1 one more pass, 2 scaled passes.


def _one_pass(spec: LayerSpec, a: jax.Array, b: jax.Array,
              axis_name) -> _OnePass:
  """Chord between the unit directions from sums read in a single pass.

  ``<a,a>, <b,b>, <a,b>, |a-b|^2`` are sibling reductions over the same
  inputs (XLA:GPU fuses them into one kernel). Two formulas give ``chord^2 = 2(1-cos)``:
  ``2 - 2<a,b>/(|a||b|)`` (exact to a few roundings for large angles) and
  ``(|a-b|^2 - (|a|-|b|)^2) / (|a||b|)`` (exact for small angles unless the
  norms changed much more than the direction). The better one is kept when
  its error bound is small relative to the result; ``level`` says otherwise.
  """
  a, b = nx.upcast(a), nx.upcast(b)
  aa = nx.unit_sum(a * a, spec, axis_name)
  bb = nx.unit_sum(b * b, spec, axis_name)
  ab = nx.unit_sum(a * b, spec, axis_name)
  diff = a - b
  dd = nx.unit_sum(diff * diff, spec, axis_name)
  # Out of range covers zero, non-finite and extreme units: the scaled
  # passes tell them apart.
  usable = nx.in_safe_range(aa) & nx.in_safe_range(bb)
  norm_a = jnp.sqrt(jnp.where(usable, aa, 1.0))
  norm_b = jnp.sqrt(jnp.where(usable, bb, 1.0))
  prod = norm_a * norm_b
  radial = norm_a - norm_b
  by_dot = 2.0 - 2.0 * ab / prod
  by_diff = (dd - radial * radial) / prod
  # Error bounds in units of one sum's relative rounding error.
  err_dot = 2.0 + 2.0 * jnp.abs(ab) / prod
  err_diff = (dd + jnp.abs(radial) * (norm_a + norm_b)) / prod + jnp.abs(by_diff)
  chord2 = jnp.clip(jnp.where(err_diff <= err_dot, by_diff, by_dot), 0.0, 4.0)
  precise = jnp.minimum(err_dot, err_diff) <= _MAX_ERROR_GROWTH * chord2
  level = jnp.where(~usable, 2, jnp.where(precise, 0, 1))
  return _OnePass(jnp.where(usable, jnp.sqrt(chord2), jnp.nan), norm_a, norm_b,
                  jnp.max(level).astype(jnp.int32))


def _second_pass(spec: LayerSpec, a: jax.Array, b: jax.Array, first: _OnePass,
                 axis_name) -> jax.Array:
  """Chord from ``|a - c b|^2`` with ``c = |a|/|b|``: no radial cancellation.

  ``|a - c b|^2 = (|a| - c|b|)^2 + c |a||b| chord^2`` for any ``c``; with
  ``c`` the measured norm ratio the first term is a rounding residue.
  """
  ratio = first.norm_a / first.norm_b
  residue = nx.upcast(a) - ratio * nx.upcast(b)
  rr = nx.unit_sum(residue * residue, spec, axis_name)
  radial = first.norm_a - ratio * first.norm_b
  chord2 = (rr - radial * radial) / (ratio * first.norm_a * first.norm_b)
  chord = jnp.sqrt(jnp.clip(chord2, 0.0, 4.0))
  return jnp.where(jnp.isnan(first.chord), jnp.nan, chord)


def _chords(specs, a_leaves, b_leaves, axis_names) -> list[jax.Array | None]:
  """Per-unit chords of every layer leaf, in float32 (None elsewhere).

  One fused pass per leaf; only when some unit needs it (a small angle with a
  large norm change, or a sum of squares outside 2**+-60) does a single
  ``lax.cond`` (one for all leaves) run the extra passes, each leaf at its
  own level.
  """
  rows = [(s, a, b, axis) for s, a, b, axis
          in zip(specs, a_leaves, b_leaves, axis_names) if s is not None]
  firsts = [_one_pass(*row) for row in rows]
  if not rows:
    return [None] * len(specs)

  def refined():
    return [jax.lax.switch(
        first.level,
        [lambda f=first: f.chord,
         lambda row=row, f=first: _second_pass(row[0], row[1], row[2], f,
                                               row[3]),
         lambda row=row: _robust_chord(*row)])
            for row, first in zip(rows, firsts)]

  needs_more = jnp.max(jnp.stack([f.level for f in firsts])) > 0
  chords = iter(jax.lax.cond(needs_more, refined,
                             lambda: [f.chord for f in firsts]))
  return [nx.to_units(next(chords), s).astype(jnp.float32)
          if s is not None else None for s in specs]


def copy_params(params: PyTree) -> PyTree:
  """The params' values in fresh buffers: a snapshot nothing else changes.

  Keep the initial params with it. An ``nnx.State`` (``nnx.state(model,
  nnx.Param)``) holds the model's own variables, which ``nnx.Optimizer``
  updates in place: kept as it is, the "initial" params follow the model
  and every rotation reads 0. Arrays of a functional (linen) loop are never
  changed in place, but a copy is also what a donated step needs.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> init_params = lx.copy_params(nnx.state(model, nnx.Param))
    >>> model.kernel[...] = jnp.eye(3, 2)       # what an optimizer step does
    >>> r = lx.layer_rotation(nnx.state(model, nnx.Param), init_params)
    >>> lx.flatten_rotations(r)['kernel'] > 0   # 'kernel', not 'kernel/value'
    True
  """
  return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def _variables(tree: PyTree) -> list[int]:
  """ids of the NNX ``Variable`` objects a tree holds ([] for other trees)."""
  if not type(tree).__module__.startswith('flax.nnx'):
    return []
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return [id(v) for v in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
          if isinstance(v, nnx.Variable)]


def _check_not_live(params: PyTree, reference: PyTree, what: str) -> None:
  """ValueError when ``reference`` holds the very variables of ``params``."""
  ours = _variables(params)
  if ours and ours == _variables(reference):
    raise ValueError(
        f'{what} holds the same NNX variables as the params: they change with '
        f'the model, so the rotation would always read 0. Snapshot them once '
        f'at init with `lx.copy_params(nnx.state(model, nnx.Param))`.')


def _per_unit(measure, params: PyTree, reference: PyTree, what: str,
              options: UnitOptions) -> PyTree:
  _check_not_live(params, reference, what)
  _layers.check_updates(params, reference, what)
  specs = options.specs(params)
  leaves, treedef = jax.tree.flatten(params)
  chords = _chords(specs, leaves, treedef.flatten_up_to(reference),
                   options.axis_names(params))
  return treedef.unflatten([c if c is None else measure(c) for c in chords])


def cosine_distance_from_chord(chord: jax.Array) -> jax.Array:
  return 0.5 * chord * chord


def angle_from_chord(chord: jax.Array) -> jax.Array:
  return 2.0 * jnp.arcsin(0.5 * chord)


@_layers.document_options('mask', 'per_neuron', 'stack_axes', 'axis_name')
def layer_rotation(
    params: PyTree,
    init_params: PyTree,
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> PyTree:
  """Each layer's rotation: cosine distance between its weights and init.

  ``1 - <w, w0> / (|w| |w0|)`` per rotation unit, weights flattened, in
  ``[0, 2]``: 0 is no rotation, 1 is orthogonal (the paper's optimum).
  Accumulated in float32 whatever the params' dtype; NaN for a unit whose
  weights (now or at init) are zero or not finite. Pure and jit-able; with
  sharded params it gives the unsharded answer.

  Cost and accuracy: one fused reduction pass per layer leaf in the common
  case; accurate to a few float32 roundings relative to the result, small
  angles included. Only when a small rotation comes with a much larger norm
  change (or a sum of squares outside ``2**+-60``) does one ``lax.cond`` run a
  second pass (or a power-of-two scaled measurement) for those leaves.

  Args:
    params: current params.
    init_params: params at initialisation, same structure and shapes.
    {options}

  Returns:
    A pytree like ``params``: a float32 array of the unit shape (a scalar
    for a whole layer) at layer leaves, ``None`` at the others.

  Raises:
    ValueError: if the two pytrees differ in structure or shape (naming the
      paths), or a unit option does not fit its leaf.
    TypeError: if a floating leaf of ``params`` is not floating in
      ``init_params`` (floating dtypes may differ: both are measured in
      float32). Integer and boolean leaves are never layers.

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
    stack_axes: PerLeaf = None,
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
