"""In-graph layer-rotation tracking: a chain link that measures, readers out.

:func:`track_rotation` keeps the initial params in its state and, every
``every`` steps, stores :func:`layer_rotation` of the params passed to
``update`` (and, with ``step_angles=True``, the angle each layer turns in
that step), inside the jitted step (no host round trip). With ``history=N``
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
from layca_jax._order import NeuronSpread


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
    step_angle: ``None`` without ``step_angles``; else the latest recorded
      step angles (radians, like ``rotation``; zero before the first record).
    step_angle_history: ``None`` without ``step_angles`` and ``history``;
      else their ring buffer, filled with ``history``'s slots and steps.
  """

  count: jax.Array
  init_params: PyTree
  rotation: PyTree
  history: PyTree
  history_steps: jax.Array | None
  history_len: jax.Array | None
  step_angle: PyTree = None
  step_angle_history: PyTree = None


def _neuron_spread(values: PyTree, specs, treedef) -> PyTree:
  """Per-neuron leaves reduced over their neurons (last axis), NaN left out."""
  def reduce(spec, v):
    if spec is None or not spec.per_neuron:
      return v
    return NeuronSpread(jnp.nanmin(v, axis=-1), jnp.nanmedian(v, axis=-1),
                        jnp.nanmax(v, axis=-1))
  return treedef.unflatten([reduce(spec, v) for spec, v
                            in zip(specs, treedef.flatten_up_to(values))])


@document_options('mask', 'per_neuron', 'stack_axes', 'axis_name')
def track_rotation(
    every: int = 1,
    *,
    history: int | None = None,
    step_angles: bool = False,
    spread: bool = False,
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

  With ``step_angles=True`` the same records also hold the angle, in
  radians, that each layer turns in step ``t``: ``lx.step_rotation(params,
  optax.apply_updates(params, updates))`` of the ``updates`` this link sees,
  so place it **last** in the chain, where they are the updates applied
  (optax's ``snapshot``/``monitor`` likewise measure what reaches them).
  Read them with :func:`tracked_step_angle` and
  :func:`step_angle_history`; :func:`replay_multipliers` turns them into
  Layca rate schedules. As with ``optax.snapshot``, the latest records are
  also ``optax.tree.get(state, 'rotation')`` and ``'step_angle'``.

  Memory: the state holds exactly one copy of the params (``init_params``,
  in their own dtype), plus one float32 per rotation unit and measure
  (times ``history + 1`` with a buffer; three per layer with ``spread``).
  Cost: one fused reduction pass per layer leaf and measure on recorded
  steps (see :func:`layer_rotation`), nothing on others.

  Args:
    every: record on steps ``0, every, 2 * every, ...``.
    history: capacity of a ring buffer keeping the last ``history`` records
      and their step numbers in the state; ``None`` for none.
    step_angles: also record each layer's angle in the step being taken.
    spread: with ``per_neuron``, record for each layer the
      :class:`NeuronSpread` (min, median, max over its neurons) of every
      measure instead of one value per neuron: three numbers per layer in
      the buffer, keys ``'path/min'``, ``'path/median'``, ``'path/max'`` in
      :func:`flatten_rotations`.
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

    Per-step angles, with their spread over neurons:

    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = optax.chain(optax.sgd(1.0), lx.track_rotation(
    ...     step_angles=True, per_neuron=True, spread=True))
    >>> state = tx.init(params)
    >>> grads = {'kernel': jnp.array([[0., -1.], [0., 0.]])}  # turns neuron 1
    >>> _, state = tx.update(grads, state, params)
    >>> {k: round(v, 4) for k, v in
    ...  lx.flatten_rotations(lx.tracked_step_angle(state)).items()}
    {'kernel/min': 0.0, 'kernel/median': 0.3927, 'kernel/max': 0.7854}
  """
  if not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f'`every` must be a positive integer, got {every!r}.')
  if history is not None and (not isinstance(history, (int, np.integer))
                              or history < 1):
    raise ValueError(
        f'`history` must be None or a positive integer, got {history!r}.')
  if spread and per_neuron is False:
    raise ValueError('`spread=True` summarises per-neuron units: it needs '
                     '`per_neuron`.')
  options = UnitOptions(mask, per_neuron, stack_axes, axis_name)

  def summarise(values, params):
    if not spread:
      return values
    return _neuron_spread(values, options.specs(params),
                          jax.tree.structure(params))

  def measure(params, updates, init_params):
    """``(rotation, step angle or None)``: one record."""
    rotation = summarise(_rotation.layer_rotation(
        params, init_params, **options._asdict()), params)
    if not step_angles:
      return rotation, None
    return rotation, summarise(_rotation.step_rotation(
        params, optax.apply_updates(params, updates), **options._asdict()),
                               params)

  def init_fn(params):
    # A copy: the state must not share the caller's buffers (donation), nor
    # follow params that are updated in place (an nnx model's state).
    init_params = _rotation.copy_params(params)
    latest = jax.tree.map(jnp.zeros_like,
                          measure(init_params, jax.tree.map(jnp.zeros_like,
                                                            params), params))
    state = TrackRotationState(jnp.zeros([], jnp.int32), init_params,
                               latest[0], None, None, None, latest[1])
    if history is None:
      return state
    buffers = jax.tree.map(
        lambda r: jnp.zeros((history,) + r.shape, r.dtype), latest)
    return state._replace(history=buffers[0], step_angle_history=buffers[1],
                          history_steps=jnp.full((history,), -1, jnp.int32),
                          history_len=jnp.zeros([], jnp.int32))

  def record(state, params, updates):
    latest = measure(params, updates, state.init_params)
    state = state._replace(rotation=latest[0], step_angle=latest[1])
    if history is None:
      return state
    slot = (state.count // every) % history
    buffers = jax.tree.map(lambda h, r: h.at[slot].set(r),
                           (state.history, state.step_angle_history), latest)
    return state._replace(
        history=buffers[0], step_angle_history=buffers[1],
        history_steps=state.history_steps.at[slot].set(state.count),
        history_len=jnp.minimum(state.history_len + 1, history))

  def update_fn(updates, state, params=None):
    _layca._require_params(params, 'track_rotation')
    if every == 1:
      new_state = record(state, params, updates)
    else:
      new_state = jax.lax.cond(state.count % every == 0, record,
                               lambda s, *_: s, state, params, updates)
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


def _records(opt_state: Any, field: str) -> tuple[np.ndarray, PyTree]:
  """``(steps, buffer)`` of one measure's ring buffer, oldest first."""
  state = _the_tracking_state(opt_state)
  if state.history is None:
    raise ValueError(
        'This lx.track_rotation state keeps no history: create it with '
        '`lx.track_rotation(history=N)`.')
  steps, n, buffer = jax.device_get(
      (state.history_steps, state.history_len, getattr(state, field)))
  steps = np.asarray(steps)[:int(n)]
  oldest_first = np.argsort(steps, kind='stable')
  return steps[oldest_first], jax.tree.map(
      lambda h: np.asarray(h)[:int(n)][oldest_first], buffer)


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
  return _records(opt_state, 'history')


def _require_step_angles(state: TrackRotationState) -> None:
  if state.step_angle is None:
    raise ValueError(
        'This lx.track_rotation state records no step angles: create it with '
        '`lx.track_rotation(step_angles=True)`, last in the chain.')


def tracked_step_angle(opt_state: Any) -> PyTree:
  """The latest step angles recorded by ``track_rotation(step_angles=True)``.

  The angle, in radians, that each layer (unit) turned in the step of the
  latest record: between the params passed to that ``update`` and those
  params plus the updates :func:`track_rotation` saw.

  Args:
    opt_state: an optimizer state holding one :func:`track_rotation` state
      at any depth.

  Returns:
    A pytree like the params: float32 angles per unit (or a
    :class:`NeuronSpread` with ``spread``) at layer leaves, ``None``
    elsewhere (device arrays; usable inside ``jit``).

  Raises:
    ValueError: when the tracking state records no step angles.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = optax.chain(lx.layca_sgd(0.1), lx.track_rotation(step_angles=True))
    >>> state = tx.init(params)
    >>> _, state = tx.update({'kernel': jnp.ones((2, 2))}, state, params)
    >>> round(float(lx.tracked_step_angle(state)['kernel']), 5)  # atan(0.1)
    0.09967
  """
  state = _the_tracking_state(opt_state)
  _require_step_angles(state)
  return state.step_angle


def step_angle_history(opt_state: Any) -> tuple[np.ndarray, PyTree]:
  """The step angles kept by ``track_rotation(history=N, step_angles=True)``.

  Same steps and order as :func:`rotation_history`: the angle recorded at
  step ``t`` is that of step ``t`` itself (from the params after ``t``
  steps to those after ``t + 1``).

  Args:
    opt_state: an optimizer state holding one :func:`track_rotation` state
      with a history buffer and step angles, at any depth.

  Returns:
    ``(steps, angles)`` on the host, as in :func:`rotation_history`: pass it
    to :func:`replay_multipliers`, or to :meth:`RotationHistory.extend`.

  Raises:
    ValueError: when the tracking state has no history buffer or records no
      step angles.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import layca_jax as lx
    >>> params = {'kernel': jnp.eye(2)}
    >>> tx = optax.chain(optax.sgd(1.0), lx.track_rotation(history=3,
    ...                                                    step_angles=True))
    >>> state = tx.init(params)
    >>> for scale in (1.0, 0.0):
    ...   _, state = tx.update({'kernel': -scale * jnp.eye(2)[::-1]}, state, params)
    >>> steps, angles = lx.step_angle_history(state)
    >>> steps.tolist(), [round(float(a), 4) for a in angles['kernel']]  # pi/4
    ([0, 1], [0.7854, 0.0])
  """
  _require_step_angles(_the_tracking_state(opt_state))
  return _records(opt_state, 'step_angle_history')
