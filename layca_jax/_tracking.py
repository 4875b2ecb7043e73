"""In-graph layer-rotation tracking: a chain link that measures, readers out.

:func:`track_rotation` keeps the initial params in its state and, every
``every`` steps, stores :func:`layer_rotation` of the params passed to
``update``, inside the jitted step (no host round trip). With ``history=N``
it also keeps the last ``N`` records in a ring buffer, for training loops run
under ``lax.scan``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from layca_jax import _layca
from layca_jax import _rotation
from layca_jax._layers import PerLeaf, PyTree, UnitOptions, document_options


class TrackRotationState(NamedTuple):
  """State of :func:`track_rotation`.

  Attributes:
    count: number of ``update`` calls so far (int32).
    init_params: the params given to ``init`` (the one copy of the params).
    rotation: the latest recorded rotations (float32 per unit, ``None`` at
      non-layer leaves); zero rotation of the initial params before the first
      record.
    history: ``None`` without ``history``; else a pytree like ``rotation``
      whose layer leaves carry a leading axis of length ``history`` (a ring
      buffer of records).
    history_steps: step number of each buffer slot (int32, -1 when empty);
      ``None`` without ``history``.
    history_len: number of filled slots (int32, at most ``history``);
      ``None`` without ``history``.
  """

  count: jax.Array
  init_params: PyTree
  rotation: PyTree
  history: PyTree
  history_steps: jax.Array | None
  history_len: jax.Array | None


@document_options('mask', 'per_neuron', 'stack_axes', 'axis_name')
def track_rotation(
    every: int = 1,
    *,
    history: int | None = None,
    mask: PerLeaf = None,
    per_neuron: PerLeaf = False,
    stack_axes: PerLeaf = None,
    axis_name: PerLeaf = None,
) -> optax.GradientTransformation:
  """Records each layer's rotation since init inside the optimizer state.

  A pass-through link (updates leave unchanged) that can sit anywhere in an
  ``optax.chain``, like ``optax.snapshot``. At step ``t`` (the ``t``-th call
  of ``update``, from 0), when ``t % every == 0``, it stores
  ``lx.layer_rotation(params, init_params)`` of the params passed to that
  ``update`` (the params after ``t`` steps), computed in-graph. Read it with
  :func:`tracked_rotation`, and the buffer with :func:`rotation_history`.

  Memory: the state holds exactly one copy of the params (``init_params``,
  in their own dtype), plus one float32 per rotation unit (times
  ``history + 1`` with a buffer). Cost: one fused reduction pass per layer
  leaf on recorded steps (see :func:`layer_rotation`), nothing on others.

  Args:
    every: record on steps ``0, every, 2 * every, ...``.
    history: capacity of a ring buffer keeping the last ``history`` records
      and their step numbers in the state; ``None`` for none.
    {options}

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.array([[1., 0.], [0., 1.]])}
    >>> tx = optax.chain(optax.sgd(1.0), lx.track_rotation(history=4))
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update({'kernel': -jnp.eye(2)[::-1]}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(lx.tracked_rotation(state)['kernel']), 4)  # after 2 steps
    0.5528
    >>> steps, rotations = lx.rotation_history(state)
    >>> steps.tolist(), [round(float(r), 4) for r in rotations['kernel']]
    ([0, 1, 2], [0.0, 0.2929, 0.5528])
  """
  if not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f'`every` must be a positive integer, got {every!r}.')
  if history is not None and (not isinstance(history, (int, np.integer))
                              or history < 1):
    raise ValueError(
        f'`history` must be None or a positive integer, got {history!r}.')
  options = UnitOptions(mask, per_neuron, stack_axes, axis_name)

  def measure(params, init_params):
    return _rotation.layer_rotation(params, init_params, **options._asdict())

  def init_fn(params):
    # A copy: the state must not share the caller's buffers (donation), nor
    # follow params that are updated in place (an nnx model's state).
    init_params = _rotation.copy_params(params)
    rotation = jax.tree.map(jnp.zeros_like, measure(init_params, params))
    if history is None:
      return TrackRotationState(jnp.zeros([], jnp.int32), init_params,
                                rotation, None, None, None)
    buffer = jax.tree.map(
        lambda r: jnp.zeros((history,) + r.shape, r.dtype), rotation)
    return TrackRotationState(jnp.zeros([], jnp.int32), init_params, rotation,
                              buffer, jnp.full((history,), -1, jnp.int32),
                              jnp.zeros([], jnp.int32))

  def record(state, params):
    rotation = measure(params, state.init_params)
    if history is None:
      return state._replace(rotation=rotation)
    slot = (state.count // every) % history
    return state._replace(
        rotation=rotation,
        history=jax.tree.map(lambda h, r: h.at[slot].set(r), state.history,
                             rotation),
        history_steps=state.history_steps.at[slot].set(state.count),
        history_len=jnp.minimum(state.history_len + 1, history))

  def update_fn(updates, state, params=None):
    _layca._require_params(params, 'track_rotation')
    if every == 1:
      new_state = record(state, params)
    else:
      new_state = jax.lax.cond(state.count % every == 0, record,
                               lambda s, _: s, state, params)
    return updates, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _the_tracking_state(opt_state: Any) -> TrackRotationState:
  found = _layca._find_states(opt_state, TrackRotationState)
  if len(found) != 1:
    raise ValueError(
        f'Expected exactly one lx.track_rotation state inside the optimizer '
        f'state, found {len(found)}: add `lx.track_rotation()` to the chain '
        f'(once).')
  return found[0]


def tracked_rotation(opt_state: Any) -> PyTree:
  """The latest rotations recorded by :func:`track_rotation`.

  Args:
    opt_state: an optimizer state holding one :func:`track_rotation` state
      at any depth (a chain, ``optax.inject_hyperparams``, a dict, ...).

  Returns:
    A pytree like the params: float32 cosine distances per unit at layer
    leaves, ``None`` elsewhere (device arrays; usable inside ``jit``).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = optax.chain(lx.track_rotation(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> float(lx.tracked_rotation(state)['kernel'])
    0.0
  """
  return _the_tracking_state(opt_state).rotation


def rotation_history(opt_state: Any) -> tuple[np.ndarray, PyTree]:
  """The records kept by ``track_rotation(history=N)``, oldest first.

  Args:
    opt_state: an optimizer state holding one :func:`track_rotation` state
      with a history buffer, at any depth.

  Returns:
    ``(steps, rotations)`` on the host: ``steps`` an int array of the ``n``
    recorded step numbers (``n <= N``), ``rotations`` a pytree like the
    params whose layer leaves are arrays with leading axis ``n``.

  Raises:
    ValueError: when the tracking state has no history buffer.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = lx.track_rotation(every=2, history=2)
    >>> state = tx.init(params)
    >>> for _ in range(7):
    ...   _, state = tx.update(params, state, params)
    >>> lx.rotation_history(state)[0].tolist()  # the buffer kept the last 2
    [4, 6]
  """
  state = jax.device_get(_the_tracking_state(opt_state))
  if state.history is None:
    raise ValueError(
        'This lx.track_rotation state keeps no history: create it with '
        '`lx.track_rotation(history=N)`.')
  n = int(state.history_len)
  steps = np.asarray(state.history_steps)[:n]
  oldest_first = np.argsort(steps, kind='stable')
  return steps[oldest_first], jax.tree.map(
      lambda h: np.asarray(h)[:n][oldest_first], state.history)
