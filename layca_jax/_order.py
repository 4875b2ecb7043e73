"""Layer order: the model's forward order, and flat per-layer metrics.

Tree flattening sorts dict keys (``Dense_10`` before ``Dense_2``, ``a_dense``
before ``z_conv``); plots, logs and the ``alpha`` family need the layers in
depth order instead. :func:`forward_order` reads it from the model's traced
computation; :func:`flatten_rotations` turns a rotation pytree into the flat
``{path: float}`` dict that metric writers take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import numpy as np

from layca_jax import _layers
from layca_jax._layers import LayerSpec, PerLeaf, PyTree, document_options


def _sub_jaxprs(value: Any) -> list[jex.Jaxpr]:
  """The jaxprs held by one equation parameter (a jaxpr, closed or a tuple)."""
  if isinstance(value, jex.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _inner_inputs(eqn: jex.JaxprEqn, sub: jex.Jaxpr, key: str) -> list[Any] | None:
  """The outer variables bound to ``sub``'s inputs, or None if unknown."""
  invars = list(eqn.invars)
  if eqn.primitive.name == 'cond':  # The branch index comes first.
    invars = invars[1:]
  elif eqn.primitive.name == 'while':
    n_cond, n_body = eqn.params['cond_nconsts'], eqn.params['body_nconsts']
    carry = invars[n_cond + n_body:]
    invars = (invars[:n_cond] + carry if key == 'cond_jaxpr'
              else invars[n_cond:n_cond + n_body] + carry)
  return invars if len(invars) == len(sub.invars) else None


def _first_uses(jaxpr: jex.Jaxpr, sources: dict[Any, int],
                order: dict[int, None]) -> None:
  """Appends to ``order`` each source index in the order equations use it.

  ``sources`` maps variables of ``jaxpr`` to the param leaf they carry.
  Equations holding sub-jaxprs (pjit, custom_jvp/vjp, scan, while, cond,
  remat, shard_map, ...) are walked inside; when their inputs cannot be
  matched to the sub-jaxpr, the equation itself counts as the use.
  """
  for eqn in jaxpr.eqns:
    used = [sources[v] for v in eqn.invars
            if isinstance(v, jex.Var) and v in sources]
    if not used:
      continue
    walked = False
    for key, value in eqn.params.items():
      for sub in _sub_jaxprs(value):
        inner = _inner_inputs(eqn, sub, key)
        if inner is None:
          continue
        walked = True
        _first_uses(sub, {iv: sources[ov] for ov, iv in zip(inner, sub.invars)
                          if isinstance(ov, jex.Var) and ov in sources}, order)
    if not walked:
      for index in used:
        order.setdefault(index, None)


@document_options('mask', 'stack_axes')
def forward_order(
    apply_fn: Callable[..., Any],
    params: PyTree,
    *inputs: Any,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    **kwargs: Any,
) -> list[str]:
  """Layer paths in the order the model's computation first uses each one.

  Traces ``apply_fn(params, *inputs, **kwargs)`` (nothing runs) and walks the
  resulting jaxpr, nested jaxprs included (``jit``, ``custom_jvp``,
  ``lax.scan``, ``nn.remat``, ...), recording the first equation that reads
  each layer leaf. Layers the computation never reads come last, in natural
  order. Paths are relative to ``params``: for a Flax module pass
  ``lambda p, x: model.apply({'params': p}, x)`` to get ``'Conv_0/kernel'``.

  Args:
    apply_fn: called as ``apply_fn(params, *inputs, **kwargs)``.
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    *inputs: example inputs (only their shapes and dtypes matter).
    {options}
    per_neuron: accepted for symmetry with the other functions (the order
      is per leaf).
    **kwargs: passed to ``apply_fn``.

  Returns:
    The '/'-joined paths of the layer leaves, input layer first; pass it as
    ``order=`` to :func:`flatten_rotations`, :func:`alpha_multipliers`, ...

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import layca_jax as lx
    >>> params = {'a_out': jnp.ones((4, 2)), 'z_in': jnp.ones((3, 4))}
    >>> apply_fn = lambda p, x: jnp.tanh(x @ p['z_in']) @ p['a_out']
    >>> lx.forward_order(apply_fn, params, jnp.ones((1, 3)))
    ['z_in', 'a_out']
  """
  specs = _layers.layer_specs(params, mask, per_neuron, stack_axes)
  closed = jax.make_jaxpr(lambda p: apply_fn(p, *inputs, **kwargs))(params)
  order: dict[int, None] = {}
  _first_uses(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars)},
              order)
  used = [specs[i].path for i in order if specs[i] is not None]
  seen = set(used)
  return used + [specs[i].path for i in _layers.layer_order(specs)
                 if specs[i].path not in seen]


class NeuronSpread(NamedTuple):
  """A per-neuron quantity summed up over each layer's neurons.

  What ``lx.track_rotation(per_neuron=True, spread=True)`` records at a
  layer leaf instead of one value per neuron: NaN units (weights zero) are
  left out. Each field has the layer's stack shape (a scalar for an
  ordinary layer). :func:`flatten_rotations` names its values
  ``'path/min'``, ``'path/median'``, ``'path/max'``.

  Example:
    >>> import layca_jax as lx
    >>> spread = lx.NeuronSpread(min=0.0, median=0.25, max=1.0)
    >>> lx.flatten_rotations({'Dense_0': {'kernel': spread}})
    {'Dense_0/kernel/min': 0.0, 'Dense_0/kernel/median': 0.25, 'Dense_0/kernel/max': 1.0}
  """

  min: Any
  median: Any
  max: Any


def ordered_leaves(rotations: PyTree,
                   order: Sequence[str] | None = None) -> list[tuple[str, Any]]:
  """``(path, value)`` of the non-None leaves of ``rotations``, in depth order.

  Natural sort of the paths by default (``Dense_2`` before ``Dense_10``), or
  the given ``order`` of layer paths (every leaf path listed once; extra
  paths are ignored). A :class:`NeuronSpread` counts as one leaf.
  """
  flat = jax.tree_util.tree_flatten_with_path(
      rotations, is_leaf=lambda x: isinstance(x, NeuronSpread))[0]
  specs = [LayerSpec(_layers.path_name(path), np.shape(leaf), 0, False)
           for path, leaf in flat]
  return [(specs[i].path, flat[i][1])
          for i in _layers.layer_order(specs, order)]


def unit_items(path: str, value: Any) -> list[tuple[str, float]]:
  """``[(path, v)]`` for a scalar, ``[(path/i, v_i), ...]`` per unit, and
  ``[(path[/i]/min, v), (path[/i]/median, v), (path[/i]/max, v)]`` for a
  :class:`NeuronSpread`."""
  stats = (value._asdict() if isinstance(value, NeuronSpread)
           else {'': value})
  stats = {name: np.asarray(v, dtype=np.float64) for name, v in stats.items()}
  shape = next(iter(stats.values())).shape
  return [('/'.join((path,) + tuple(map(str, index)) + ((name,) if name else ())),
           float(values[index]))
          for index in np.ndindex(shape) for name, values in stats.items()]


def flatten_rotations(rotations: PyTree, order: Sequence[str] | None = None,
                      prefix: str = '') -> dict[str, float]:
  """Flat ``{name: float}`` of per-layer rotations, in depth order.

  Ready for TensorBoard, W&B or clu writers. Keys are the '/'-joined leaf
  paths (``'Conv_0/kernel'``), with ``prefix`` prepended; a per-unit leaf
  (``per_neuron`` or ``stack_axes``) expands to one key per unit,
  ``'path/i'`` (``'path/i/j'`` for two unit axes), and a
  :class:`NeuronSpread` (``track_rotation(spread=True)``) to
  ``'path/min'``, ``'path/median'``, ``'path/max'``. ``None`` leaves are
  skipped.

  Args:
    rotations: a pytree as from :func:`layer_rotation`,
      :func:`step_rotation`, :func:`tracked_rotation` or
      :func:`tracked_step_angle` (host or device).
    order: layer paths in depth order (e.g. :func:`forward_order`); ``None``
      for a natural sort of the paths.
    prefix: prepended to every key, e.g. ``'rotation/'``.

  Returns:
    A dict of Python floats, its keys in depth order.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> rotations = {'Dense_10': {'kernel': jnp.array(0.5), 'bias': None},
    ...              'Dense_2': {'kernel': jnp.array([0.25, 0.0])}}
    >>> lx.flatten_rotations(rotations, prefix='rot/')
    {'rot/Dense_2/kernel/0': 0.25, 'rot/Dense_2/kernel/1': 0.0, 'rot/Dense_10/kernel': 0.5}
  """
  return {prefix + name: value
          for path, leaf in ordered_leaves(jax.device_get(rotations), order)
          for name, value in unit_items(path, leaf)}
