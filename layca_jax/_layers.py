"""Which leaves are layers, how they split into rotation units, and their order.

Every public function of layca-jax that looks at layers goes through
:func:`layer_specs`, so "what is a layer" has one meaning everywhere:

* By default a layer is a real floating-point leaf with at least two
  dimensions per slice (kernels of dense, ``DenseGeneral``, conv and
  attention layers, embeddings, LoRA matrices), unless its name says it is
  a bias or a normalisation parameter: following Flax's parameter names
  (linen and NNX), a leaf named ``bias`` or ``*_bias``, ``scale`` or
  ``*_scale``, ``mean`` or ``var`` is never a layer, whatever its rank
  (attention's 2-D ``query/key/value`` biases, scanned ``LayerNorm``
  scales). Integer and boolean leaves are never layers; complex leaves are
  a ``TypeError`` unless a ``mask`` excludes them.
* A leaf's name is the last key of its path; NNX ``Variable`` wrappers
  (paths ending in ``.value``) are seen through, so an ``nnx.State`` has
  the same paths (``'linear/kernel'``) as the equivalent dict.
* ``mask`` overrides the default: a bool pytree matching the params (or a
  prefix of them), or a callable taking the params and returning one.
* ``per_neuron=True`` makes each output channel (the last axis, flax's layout)
  a rotation unit of its own instead of the whole tensor.
* ``stack_axes=k`` says that the first ``k`` axes index independent layers
  (params of ``nn.scan``/``nnx.scan``/``vmap``-ed blocks): each slice is a
  layer. The default ``ndim >= 2`` rule then applies to a slice.

``per_neuron`` and ``stack_axes`` accept a single value, a pytree of values
matching the params, or a callable of the params.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
PerLeaf = Union[Any, PyTree, Callable[[PyTree], PyTree]]
"""An option given once for all leaves, as a pytree matching the params, or
as a callable of the params returning such a pytree."""


class LayerSpec(NamedTuple):
  """How one leaf splits into rotation units.

  Attributes:
    path: the leaf's '/'-joined path, e.g. ``'Conv_0/kernel'``.
    shape: the leaf's shape.
    stack_axes: how many leading axes index independent layers.
    per_neuron: whether each output channel (last axis) is its own unit.
  """

  path: str
  shape: tuple[int, ...]
  stack_axes: int
  per_neuron: bool

  @property
  def reduce_axes(self) -> tuple[int, ...]:
    """Axes summed over to get one number per unit."""
    end = len(self.shape) - (1 if self.per_neuron else 0)
    return tuple(range(self.stack_axes, end))

  @property
  def unit_shape(self) -> tuple[int, ...]:
    """Shape of per-unit quantities (norms, rotations, multipliers)."""
    return tuple(self.shape[a] for a in range(len(self.shape))
                 if a not in self.reduce_axes)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """Shape indexing the independent layers held by this leaf."""
    return tuple(self.shape[: self.stack_axes])

  @property
  def keepdims_shape(self) -> tuple[int, ...]:
    """Per-unit shape with reduced axes kept as 1, broadcastable to the leaf."""
    return tuple(1 if a in self.reduce_axes else d
                 for a, d in enumerate(self.shape))


def _is_variable_value(key: Any) -> bool:
  """An NNX ``Variable``'s own ``.value`` key (not a dict entry 'value')."""
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name == 'value'


def path_name(path: Sequence[Any]) -> str:
  """Joins a jax key path into ``'a/b/0/c'``, seeing through NNX variables.

  Example:
    >>> import jax
    >>> from layca_jax._layers import path_name
    >>> path_name((jax.tree_util.DictKey('dense'), jax.tree_util.DictKey('kernel'),
    ...            jax.tree_util.GetAttrKey('value')))
    'dense/kernel'
  """
  if len(path) > 1 and _is_variable_value(path[-1]):
    path = path[:-1]
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """'/'-joined paths of the leaves of ``tree``, in flattening order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def natural_key(name: str) -> tuple:
  """Sort key under which ``Dense_2`` precedes ``Dense_10``."""
  return tuple(int(t) if t.isdigit() else t
               for t in re.split(r'(\d+)', name))


def _key_name(key: Any) -> Any:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _key_names(path: Sequence[Any]) -> tuple[Any, ...]:
  """A leaf's path as plain names, seeing through NNX variables."""
  if len(path) > 1 and _is_variable_value(path[-1]):
    path = path[:-1]
  return tuple(_key_name(key) for key in path)


def _option_by_path(option: Mapping, names: tuple[Any, ...],
                    is_value: Callable[[Any], bool], used: set) -> Any:
  """The entry of a nested-dict prefix covering a leaf, None if none does."""
  node = option
  for depth, name in enumerate(names):
    if is_value(node):
      return node
    if not isinstance(node, Mapping) or name not in node:
      return None
    node = node[name]
    used.add(names[:depth + 1])
  return node if is_value(node) else None


def _dict_paths(option: Mapping, is_value, prefix=()) -> list[tuple[Any, ...]]:
  paths = []
  for key, value in option.items():
    if isinstance(value, Mapping) and not is_value(value):
      paths += _dict_paths(value, is_value, prefix + (key,)) or [prefix + (key,)]
    else:
      paths.append(prefix + (key,))
  return paths


def broadcast_option(option: PerLeaf, params: PyTree, name: str,
                     is_value: Callable[[Any], bool]) -> list[Any]:
  """Resolves a per-leaf option to a flat list aligned with params' leaves.

  Args:
    option: one value for all leaves, a pytree matching (or a prefix of) the
      params, or a callable of the params returning either. A nested dict
      is also matched by path against any params container (a dict, a
      ``FrozenDict``, an ``nnx.State``): each leaf takes the entry of its
      longest listed path prefix, and leaves it does not list take ``None``
      (the option's default), so ``{'blocks': 1}`` is enough.
    params: the parameter pytree.
    name: the option's name, for error messages.
    is_value: tells a single value from a pytree of values.

  Returns:
    One value per leaf of ``params``, in flattening order.

  Raises:
    ValueError: when the option's structure fits neither way, naming the
      option's paths that match no leaf.
  """
  treedef = jax.tree.structure(params)
  if callable(option) and not is_value(option):
    option = option(params)
  if is_value(option):
    return [option] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(option)
  except (ValueError, TypeError) as e:
    error = e
  try:  # A prefix of params: broadcast each entry over its subtree.
    expanded = jax.tree.map(
        lambda o, sub: jax.tree.map(lambda _: o, sub), option, params,
        is_leaf=lambda x: x is None or is_value(x))
    return treedef.flatten_up_to(expanded)
  except (ValueError, TypeError):
    pass
  if isinstance(option, Mapping):
    used: set = set()
    found = [_option_by_path(option, _key_names(path), is_value, used)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unknown = [p for p in _dict_paths(option, is_value) if p not in used]
    if not unknown:
      return found
    raise ValueError(
        f'`{name}` lists paths that match no leaf of the params: '
        f'{["/".join(map(str, p)) for p in unknown[:5]]}.')
  raise ValueError(
      f'`{name}` must be a single value, a pytree matching the params, a '
      f'nested dict of their paths, or a callable of the params; its '
      f'structure does not match the params: {error}')


def _is_bool(x: Any) -> bool:
  return x is None or isinstance(x, (bool, np.bool_)) or (
      hasattr(x, 'dtype') and getattr(x, 'shape', None) == ()
      and x.dtype == bool)


def _is_int(x: Any) -> bool:
  return x is None or (isinstance(x, (int, np.integer))
                       and not isinstance(x, bool)) or (
                           getattr(x, 'shape', None) == ()
                           and jnp.issubdtype(x.dtype, jnp.integer))


def is_floating(leaf: Any) -> bool:
  """Whether a leaf is a floating-point array (only those can be layers)."""
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _is_complex(leaf: Any) -> bool:
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating)


# Flax's names (linen and NNX) for parameters that are never layers.
_NON_LAYER_NAMES = frozenset({'bias', 'scale', 'mean', 'var'})


def is_non_layer_name(name: str) -> bool:
  """Whether a leaf's name marks a bias or a normalisation parameter.

  Example:
    >>> from layca_jax._layers import is_non_layer_name
    >>> [is_non_layer_name(n) for n in ('query/bias', 'ln/scale', 'kernel', 'lora_b')]
    [True, True, False, False]
  """
  leaf = name.rsplit('/', 1)[-1]
  return (leaf in _NON_LAYER_NAMES or leaf.endswith('_bias')
          or leaf.endswith('_scale'))


def _static_int(value: Any, name: str, path: str) -> int:
  """``value`` as a Python int, or a TypeError naming the leaf if traced."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{name} at {path!r} is a traced value, but it decides array shapes '
        f'and must be static. optax.inject_hyperparams injects every numeric '
        f'argument: pass static_args=({name!r},) to it.')
  return int(value or 0)


_OPTION_DOCS = {
    'non_layer_learning_rate': (
        '``None`` (default) freezes non-layer leaves, as in the paper; a '
        'rate (float or schedule) trains them with the base direction.'),
    'mask': (
        'which leaves are layers: ``None`` for the default rule (real '
        'floating leaves with at least two dimensions per slice, except '
        'those Flax names ``bias``/``*_bias``, ``scale``/``*_scale``, '
        '``mean``, ``var``), else a bool pytree (or a prefix) or a callable '
        'of params. Integer and boolean leaves are never layers.'),
    'per_neuron': (
        'one rotation unit per output channel (last axis) instead of one per '
        'layer.'),
    'stack_axes': (
        'leading axes indexing independent layers (scanned blocks): each '
        'slice is a layer. ``None`` or 0 for none; a dict prefix such as '
        '``{"blocks": 1}`` works for dicts and ``nnx.State`` alike.'),
    'multipliers': (
        'per-unit rate multipliers: a pytree matching params (values at '
        'non-layer leaves ignored) or a callable of params, holding scalars, '
        'stack-shaped or unit-shaped arrays, or schedules (callables of the '
        'step count); e.g. from :func:`alpha_multipliers` or '
        ':func:`replay_multipliers`.'),
    'axis_name': (
        'mesh axis a layer is split over inside ``shard_map``/``pmap`` '
        '(per-unit sums are ``psum``-ed): one name, or a pytree/callable per '
        'leaf with ``None`` for replicated leaves. A transform\'s ``init`` '
        'must then run under the same mapping.'),
}


def document_options(*names: str) -> Callable[[Any], Any]:
  """Decorator: the docstring line ``{options}`` becomes the shared
  descriptions of the options ``names``, so every public function words
  them the same way."""
  text = ''.join(
      textwrap.fill(f'{name}: {_OPTION_DOCS[name]}', width=78,
                    initial_indent=' ' * 4, subsequent_indent=' ' * 6) + '\n'
      for name in names)

  def decorate(obj):
    if '    {options}\n' not in (obj.__doc__ or ''):
      raise ValueError(f'{obj.__name__} has no {{options}} line to fill.')
    obj.__doc__ = obj.__doc__.replace('    {options}\n', text)
    return obj

  return decorate


@document_options('mask', 'per_neuron', 'stack_axes')
def layer_specs(
    params: PyTree,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
) -> list[LayerSpec | None]:
  """Decides which leaves of ``params`` are layers and how they split.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    {options}

  Returns:
    A flat list aligned with ``jax.tree.leaves(params)``: a
    :class:`LayerSpec` for each layer leaf, ``None`` for the others.

  Raises:
    ValueError: when an option does not fit its leaf, naming the leaf path.

  Example:
    >>> import jax.numpy as jnp
    >>> from layca_jax._layers import layer_specs
    >>> params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)}}
    >>> [s and s.path for s in layer_specs(params)]
    [None, 'dense/kernel']
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  masks = (broadcast_option(mask, params, 'mask', _is_bool)
           if mask is not None else [None] * len(flat))
  neurons = broadcast_option(per_neuron, params, 'per_neuron', _is_bool)
  stacks = broadcast_option(stack_axes, params, 'stack_axes', _is_int)
  specs = []
  for (path, leaf), m, neuron, stack in zip(flat, masks, neurons, stacks):
    name = path_name(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    stack = _static_int(stack, 'stack_axes', name)
    neuron = bool(neuron)
    if _is_complex(leaf) and (m is None or bool(m)):
      raise TypeError(
          f'Params at {name!r} are complex ({leaf.dtype}): layer rotation is '
          f'defined for real weights. Exclude the leaf with `mask` (it is '
          f'then a non-layer leaf: frozen by the Layca optimizers unless '
          f'non_layer_learning_rate is given).')
    if stack < 0:
      raise ValueError(f'stack_axes at {name!r} must be >= 0, got {stack}.')
    if stack > len(shape) and is_floating(leaf) and (m is None or bool(m)):
      raise ValueError(
          f'stack_axes={stack} at {name!r} is out of range for its shape '
          f'{shape}: at most {len(shape)} leading axes can index layers. Give '
          f'stack_axes per leaf (a pytree or a prefix of the params).')
    if m is None:
      is_layer = (is_floating(leaf) and len(shape) - stack >= 2
                  and not is_non_layer_name(name))
    else:
      is_layer = bool(m) and is_floating(leaf)
    if not is_layer:
      specs.append(None)
      continue
    need = stack + (2 if neuron else 1)
    if len(shape) < need:
      what = (f'stack_axes={stack}' + (' and per_neuron=True' if neuron else ''))
      raise ValueError(
          f'Layer {name!r} of shape {shape} cannot be split with {what}: it '
          f'needs at least {need} dimensions ({stack} stacked, '
          f'{"an output axis and " if neuron else ""}at least one reduced).')
    specs.append(LayerSpec(name, shape, stack, neuron))
  return specs


def check_same_structure(params: PyTree, other: PyTree, what: str,
                         none_is_leaf: bool = False) -> None:
  """Raises a ValueError naming the first path where ``other`` differs.

  Structure and shapes are compared leaf by leaf. With ``none_is_leaf``,
  ``other`` is a per-leaf state (``None`` entries stand for whole leaves, and
  other entries need not have the leaf's shape): only structure is compared.
  """
  is_leaf = (lambda x: x is None) if none_is_leaf else None
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  o_flat, o_def = jax.tree_util.tree_flatten_with_path(other, is_leaf=is_leaf)
  if none_is_leaf:
    try:
      p_def.flatten_up_to(other)
      same = len(o_flat) == len(p_flat)
    except (ValueError, TypeError):
      same = False
  else:
    same = p_def == o_def
  if not same:
    p_paths = {path_name(p) for p, _ in p_flat}
    o_paths = {path_name(p) for p, _ in o_flat}
    missing = sorted(p_paths - o_paths, key=natural_key)
    extra = sorted(o_paths - p_paths, key=natural_key)
    raise ValueError(
        f'{what} must have the structure of params. Missing paths: '
        f'{missing or "none"}; unexpected paths: {extra or "none"}.'
        + ('' if missing or extra else f' Tree definitions: {p_def} vs {o_def}.'))
  if none_is_leaf:
    return
  for (path, p), (_, o) in zip(p_flat, o_flat):
    if np.shape(p) != np.shape(o):
      raise ValueError(
          f'{what} at {path_name(path)!r} has shape {np.shape(o)}, expected '
          f'{np.shape(p)} (the shape of params).')


def check_updates(params: PyTree, updates: PyTree, what: str = 'updates') -> None:
  """Checks that ``updates`` can update ``params``, naming the leaf if not.

  Structure and shapes must match exactly (no broadcasting). Where a param is
  floating, its update must be floating too, of any width: float32 gradients
  for bfloat16 params are fine, an integer or boolean update is a TypeError.
  Non-floating params (never layers) accept any update.

  Example:
    >>> import jax.numpy as jnp
    >>> from layca_jax._layers import check_updates
    >>> params = {'dense': {'kernel': jnp.ones((3, 4), jnp.bfloat16)}}
    >>> check_updates(params, {'dense': {'kernel': jnp.ones((3, 4))}})
    >>> check_updates(params, {'dense': {'kernel': jnp.ones((4, 3))}})
    Traceback (most recent call last):
    ...
    ValueError: updates at 'dense/kernel' has shape (4, 3), expected (3, 4) (the shape of params).
  """
  check_same_structure(params, updates, what)
  p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, p), u in zip(p_flat, jax.tree.leaves(updates)):
    if is_floating(p) and not is_floating(u):
      raise TypeError(
          f'{what} at {path_name(path)!r} has dtype '
          f'{getattr(u, "dtype", type(u).__name__)}, expected a floating dtype '
          f'for params of dtype {p.dtype}.')


# ---------------------------------------------------------------------------
# Layer order and the alpha family of layer-wise rates.


def layer_order(specs: Sequence[LayerSpec | None],
                order: Sequence[str] | None = None) -> list[int]:
  """Indices (into ``specs``) of the layer leaves in forward order.

  Args:
    specs: as returned by :func:`layer_specs`.
    order: ``None`` for a natural sort of the paths (``Dense_2`` before
      ``Dense_10``), or the layer paths in forward order (e.g. from
      :func:`layca_jax.forward_order`). Every layer path must appear once;
      paths of non-layer leaves are skipped.

  Returns:
    Leaf indices of the layers, input layer first.
  """
  index = {s.path: i for i, s in enumerate(specs) if s is not None}
  if order is None:
    return [index[p] for p in sorted(index, key=natural_key)]
  if isinstance(order, str):
    raise TypeError('`order` must be a sequence of layer paths, not a string.')
  known = {s.path for s in specs if s is not None}
  listed = [p for p in order if p in known]
  dupes = sorted({p for p in listed if listed.count(p) > 1})
  missing = sorted(known - set(listed), key=natural_key)
  if dupes or missing:
    raise ValueError(
        f'`order` must list every layer path exactly once. Missing: '
        f'{missing or "none"}; repeated: {dupes or "none"}.')
  return [index[p] for p in listed]


def alpha_rates(num_layers: int, alpha: float) -> np.ndarray:
  """The paper's layer-wise rate multipliers ``m_l`` for ``alpha``.

  ``alpha > 0`` slows early layers: ``m_l = ((1 - alpha)^(5/(L-1)))^(L-1-l)``;
  ``alpha <= 0`` slows late layers: ``m_l = ((1 + alpha)^(5/(L-1)))^l``.
  """
  alpha = float(alpha)
  if not -1.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must lie in [-1, 1], got {alpha}.')
  if num_layers <= 1:
    return np.ones(num_layers)
  l = np.arange(num_layers, dtype=np.float64)
  last = num_layers - 1
  if alpha > 0:
    return ((1.0 - alpha) ** (5.0 / last)) ** (last - l)
  return ((1.0 + alpha) ** (5.0 / last)) ** l


@document_options('mask', 'per_neuron', 'stack_axes')
def alpha_multipliers(
    params: PyTree,
    alpha: float,
    order: Sequence[str] | None = None,
    *,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
) -> PyTree:
  """The paper's ``alpha`` family of layer-wise rotation rate multipliers.

  With ``L`` layers in forward order (``l = 0`` is the input layer),
  ``alpha > 0`` gives ``m_l = ((1 - alpha) ** (5 / (L - 1))) ** (L - 1 - l)``
  (early layers rotate slower), ``alpha <= 0`` gives
  ``m_l = ((1 + alpha) ** (5 / (L - 1))) ** l`` (late layers slower);
  ``alpha = 0`` is uniform. Each slice of a stacked leaf counts as a layer.

  Args:
    params: the parameter pytree.
    alpha: in ``[-1, 1]``.
    order: layer paths in forward order; ``None`` for a natural sort of paths.
    {options}

  Returns:
    A pytree like ``params``: a float32 array of the layer's stack shape
    (a scalar for an ordinary layer) at layer leaves, ``None`` elsewhere.
    Pass it as ``multipliers=`` to any Layca transform.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> params = {f'Dense_{i}': {'kernel': jnp.ones((4, 4))} for i in range(3)}
    >>> m = lx.alpha_multipliers(params, 0.5)
    >>> [round(float(m[f'Dense_{i}']['kernel']), 4) for i in range(3)]
    [0.0312, 0.1768, 1.0]
  """
  specs = layer_specs(params, mask, per_neuron, stack_axes)
  leaf_order = layer_order(specs, order)
  sizes = [math.prod(specs[i].stack_shape) for i in leaf_order]
  rates = alpha_rates(sum(sizes), alpha)
  by_leaf = {}
  start = 0
  for i, n in zip(leaf_order, sizes):
    by_leaf[i] = jnp.asarray(
        rates[start:start + n].reshape(specs[i].stack_shape), jnp.float32)
    start += n
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([by_leaf.get(i) for i in range(len(leaves))])


def _is_axis_name(x: Any) -> bool:
  return x is None or isinstance(x, str) or (
      isinstance(x, tuple) and all(isinstance(a, str) for a in x))


@document_options('mask', 'per_neuron', 'stack_axes', 'axis_name')
class UnitOptions(NamedTuple):
  """The options every layer-aware function shares, resolved in one place.

  Attributes:
    {options}
  """

  mask: PerLeaf = None
  per_neuron: PerLeaf = False
  stack_axes: PerLeaf = None
  axis_name: PerLeaf = None

  def specs(self, params: PyTree) -> list[LayerSpec | None]:
    return layer_specs(params, self.mask, self.per_neuron, self.stack_axes)

  def axis_names(self, params: PyTree) -> list[Any]:
    return broadcast_option(self.axis_name, params, 'axis_name', _is_axis_name)
