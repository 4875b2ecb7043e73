"""The fused Layca optimizers: a base direction and Algorithm 1 as one transform.

Since Layca's step is orthogonal to the weights, steps 1-4 of Algorithm 1
collapse, per rotation unit with weights ``w``, base direction ``d``, rate
``r`` and initial norm ``n0``, to

    w_new = K * (w / |w| - r * t / |t|),   t = d - c * w,   c = <d,w> / <w,w>,

with ``K = n0 / sqrt(1 + r^2)`` and ``|t|^2 = <d,d> - c * <d,w>``: each step
reads ``(w, d)`` once for three per-unit sums and once more for ``w_new``,
the memory-traffic floor (:mod:`layca_jax._closed_form` has the
coefficients and the careful fallback). This module wires that to a base
optimizer: finiteness checks before the base, rate schedules and
multipliers, non-layer leaves, and the state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from layca_jax import _closed_form as cf
from layca_jax import _layca
from layca_jax import _numerics as nx
from layca_jax import _rotation
from layca_jax._layca import LaycaState
from layca_jax._layers import LayerSpec, PerLeaf, UnitOptions

Rate = Any  # float, scalar array or optax schedule.


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


def _whole_leaf(path: str, leaf: jax.Array) -> LayerSpec:
  """A spec making a whole (non-layer) leaf one unit."""
  return LayerSpec(path, tuple(jnp.shape(leaf)), 0, False)


def _finite_units(spec: LayerSpec, x: jax.Array, axis_name) -> jax.Array:
  """Per-unit flags (keepdims shape): False where the unit holds NaN/Inf."""
  return jnp.isfinite(nx.unit_max_abs(x, spec, axis_name))


def _computed_once(directions: Any) -> Any:
  """``directions`` behind ``optimization_barrier``: computed once, then read.

  The sample, the sums and the elementwise pass all read the direction; left
  to XLA:GPU or XLA:CPU, each fusion recomputes it from the base state
  (Adam: ``g``, ``mu`` and ``nu`` read three times instead of ``d`` twice).
  Not used where :func:`layca_jax._closed_form.leaves_stay_on_chip`: XLA:TPU
  then keeps the direction in on-chip memory between the base's fusion and
  Layca's, which a barrier would prevent (it waits for every leaf's
  direction; GPT-2-small, Adam: HBM traffic 1.61x ``optax.adam`` with it,
  1.35x without; benchmarks/README.md). Under ``shard_map`` a barrier makes
  all its operands vary along the mesh axes any of them varies along: leaves
  are grouped by those axes (one group outside ``shard_map``).
  """
  leaves, treedef = jax.tree.flatten(directions)
  groups: dict[Any, list[int]] = {}
  for i, leaf in enumerate(leaves):
    aval = jax.typeof(leaf)  # Older jax names the varying axes `vma`.
    key = (getattr(aval, 'manual_axis_type', None), getattr(aval, 'vma', None))
    groups.setdefault(key, []).append(i)
  for ids in groups.values():
    barred = jax.lax.optimization_barrier([leaves[i] for i in ids])
    for i, leaf in zip(ids, barred):
      leaves[i] = leaf
  return treedef.unflatten(leaves)


def _rate_value(rate: Rate, count: jax.Array) -> jax.Array:
  """The rate at ``count``, floating (float32 unless given wider: each layer
  then takes it in its own accumulation dtype)."""
  value = jnp.asarray(rate(count) if callable(rate) else rate)
  if not jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(jnp.float32)
  return value


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
  keep_norm())`` on layer leaves (free units, zero at init, step by
  ``-rate * d``). Non-layer leaves are frozen (zero update,
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
                           base=_rotation.copy_params(base.init(params)),
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
    if base_has_state and not cf.leaves_stay_on_chip():
      directions = _computed_once(directions)
    # optax moments of integer leaves come back float32: keep the state's
    # dtypes fixed, as lax.scan carries and optax.apply_if_finite need.
    base_state = jax.tree.map(lambda new, old: new.astype(old.dtype),
                              base_state, state.base)
    d_leaves = treedef.flatten_up_to(directions)

    rate = _rate_value(learning_rate, state.count)
    mults = _layca.multiplier_values(multipliers, params, specs, state.count)
    rates = [rate if m is None else rate * m for m in mults]
    coefs = cf.coefficients(
        cf.LAYCA_UPDATE, specs, leaves, d_leaves, axes,
        _layca.unit_values(state.layca.initial_norm, specs, treedef), rates)

    updates = []
    for i, (spec, g, d) in enumerate(zip(specs, grad_leaves, d_leaves)):
      if spec is None:
        if not trained_non_layer:
          updates.append(jnp.zeros_like(g))
        else:
          nl_rate = _rate_value(non_layer_learning_rate, state.count)
          step = (-nl_rate * nx.upcast(d)).astype(g.dtype)
          updates.append(jnp.where(grad_ok[i], step, jnp.zeros_like(step)))
        continue
      if grad_ok[i] is not None:
        coefs[i] = coefs[i]._replace(moves=coefs[i].moves & grad_ok[i],
                                     finite=coefs[i].finite & grad_ok[i])
      updates.append(cf.apply_coefficients(coefs[i], leaves[i], d, g.dtype))

    new_layca = _layca.next_state(state.layca, coefs, specs, treedef)
    return treedef.unflatten(updates), FusedLaycaState(
        optax.safe_increment(state.count), base_state, new_layca)

  return optax.GradientTransformation(init_fn, update_fn)
