"""Measure, then match: Layca rate schedules that replay a rotation profile.

Layca turns every layer unit by exactly ``atan(rate * multiplier)`` per
step, whatever the base direction. So the per-step angles ``theta_l(t)``
recorded from any run (``lx.track_rotation(step_angles=True)``, last in that
run's chain) become per-layer multiplier schedules
``m_l(t) = tan(theta_l(t)) / rate``, under which Layca turns each layer by
the recorded angle at every step. The profile can be edited first (evened
out across layers, scaled, smoothed) to explore other layer-rotation
configurations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layca_jax._history import RotationHistory
from layca_jax._layers import PyTree, path_name
from layca_jax._order import NeuronSpread

Rate = float | Callable[[jax.Array], jax.Array]


def _check_steps(steps: Any, n: int) -> np.ndarray:
  steps = np.asarray(steps)
  if steps.shape != (n,) or n == 0:
    raise ValueError(
        f'Expected one step number per record ({n} records), got steps of '
        f'shape {steps.shape}.')
  if not np.issubdtype(steps.dtype, np.integer) and not np.all(
      steps == np.round(steps)):
    raise ValueError(f'Step numbers must be integers, got {steps[:5]}...')
  steps = steps.astype(np.int64)
  if np.any(np.diff(steps) <= 0):
    raise ValueError('Step numbers must be strictly increasing.')
  return steps


def _tangents(path: str, angles: Any, n: int) -> np.ndarray:
  """``tan(angles)`` in float64, after checking they can be Layca steps."""
  angles = np.asarray(angles, dtype=np.float64)
  if angles.ndim == 0 or angles.shape[0] != n:
    raise ValueError(
        f'The angles of {path!r} must have a leading axis of one entry per '
        f'record ({n}), got shape {angles.shape}.')
  bad = ~(np.isfinite(angles) & (angles >= 0) & (angles < np.pi / 2))
  if np.any(bad):
    first = np.argwhere(bad)[0]
    raise ValueError(
        f'The angles of {path!r} must be finite and in [0, pi/2) to be a '
        f'Layca step (atan of a rate), got {angles[tuple(first)]} at record '
        f'{first[0]}. NaN marks a unit that was zero: drop its curve (or set '
        f'its leaf to None) to leave it at multiplier 1.')
  return np.tan(angles)


def _schedule(steps: np.ndarray, tangents: np.ndarray,
              learning_rate: Rate) -> Callable[[jax.Array], jax.Array]:
  """``count -> tan(theta(count)) / learning_rate``: linear between records,
  held before the first and after the last."""
  if callable(learning_rate):
    values = jnp.asarray(tangents, jnp.float32)
  else:
    values = jnp.asarray(tangents / float(learning_rate), jnp.float32)
  knots = jnp.asarray(steps, jnp.int32)
  last = len(steps) - 1

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.int32)
    i = jnp.clip(jnp.searchsorted(knots, count, side='right') - 1, 0, last)
    j = jnp.minimum(i + 1, last)
    span = jnp.maximum(knots[j] - knots[i], 1)
    weight = jnp.clip((count - knots[i]) / span, 0.0, 1.0).astype(jnp.float32)
    value = values[i] + weight * (values[j] - values[i])
    return value / learning_rate(count) if callable(learning_rate) else value

  return schedule


def _nested(flat: Mapping[str, Any]) -> dict:
  """``{'a/b': v}`` -> ``{'a': {'b': v}}``, the path-matched option form."""
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = out
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f'Curve {name!r} lies under another curve.')
    if leaf in node:
      raise ValueError(f'Curve {name!r} is also the parent of other curves.')
    node[leaf] = value
  return out


def replay_multipliers(
    angles: Any,
    learning_rate: Rate = 1.0,
    *,
    steps: Sequence[int] | None = None,
) -> PyTree:
  """Per-layer multiplier schedules under which Layca replays recorded angles.

  Layca turns each unit by ``atan(learning_rate * m)`` per step, so with
  ``m_l(t) = tan(theta_l(t)) / learning_rate`` it turns layer ``l`` by the
  recorded ``theta_l(t)`` at step ``t``, whatever its base direction. Pass
  the result as ``multipliers=`` to any Layca optimizer or ``lx.layca``
  link, with the same ``learning_rate`` (for the link: the rate of the
  scaling link after it, e.g. ``optax.sgd(learning_rate)``). Between
  recorded steps (``every > 1``) the schedule interpolates linearly; before
  the first and after the last record it holds the nearest value.

  What is replayed is each layer's per-step angle, not the trajectory: the
  cosine distance from init also depends on the directions of the steps,
  which are the new run's own. Driven by the same base directions as the
  recorded run (its own updates, or its gradients with the same momentum),
  Layca follows the recorded run's weight directions, and so its
  layer-rotation curves, to float32 precision; the norms stay at their
  initial values, while the recorded run may have changed them.

  Args:
    angles: recorded per-step angles (radians, in ``[0, pi/2)``), as
      ``(steps, tree)`` from :func:`step_angle_history` (layer leaves with a
      leading record axis; per-unit arrays give per-unit schedules), as a
      :class:`RotationHistory` of step angles, or as a mapping ``{path:
      angles}`` (a record per step from 0, or at ``steps``), possibly
      edited (e.g. evened out across layers).
    learning_rate: the Layca rate the multipliers go with (float or
      schedule of the step count; positive).
    steps: with a mapping, the step number of each record (default
      ``0, 1, 2, ...``).

  Returns:
    Multipliers with a schedule (a callable of the step count) at every
    recorded layer: a pytree like the recorded one (``None`` at non-layer
    leaves) from ``(steps, tree)``, else a nested dict of the paths, which
    ``multipliers=`` matches by path. Unlisted layers keep multiplier 1.

  Raises:
    ValueError: for an angle that is NaN, negative or not below ``pi/2``
      (naming the curve), records of :class:`NeuronSpread` (a median is no
      unit's angle: record without ``spread``), or steps that are not
      strictly increasing integers.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import layca_jax as lx
    >>> angles = {'Dense_0/kernel': [0.1, 0.2], 'Dense_1/kernel': [0.3, 0.3]}
    >>> m = lx.replay_multipliers(angles, learning_rate=0.5)
    >>> round(float(m['Dense_0']['kernel'](1)), 5)  # tan(0.2) / 0.5
    0.40542
    >>> params = {'Dense_0': {'kernel': jnp.eye(2)}, 'Dense_1': {'kernel': jnp.eye(2)}}
    >>> tx = lx.layca_sgd(0.5, multipliers=m)
    >>> state = tx.init(params)
    >>> grads = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...          'Dense_1': {'kernel': jnp.ones((2, 2))}}
    >>> for t in range(2):
    ...   updates, state = tx.update(grads, state, params)
    ...   new = lx.step_rotation(params, jax.tree.map(jnp.add, params, updates))
    ...   print(t, [round(float(a), 5) for a in jax.tree.leaves(new)])
    0 [0.1, 0.3]
    1 [0.2, 0.3]
  """
  if not callable(learning_rate) and not float(learning_rate) > 0:
    raise ValueError(
        f'learning_rate must be positive, got {learning_rate!r}.')
  if isinstance(angles, tuple) and len(angles) == 2:
    record_steps, tree = angles
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, NeuronSpread))
    if any(isinstance(leaf, NeuronSpread) for _, leaf in flat):
      raise ValueError(
          'These records hold the spread of per-neuron angles (min, median, '
          'max), which no unit turned by: record without `spread` to replay '
          'per neuron, or per layer without `per_neuron`.')
    n = len(np.asarray(record_steps))
    record_steps = _check_steps(record_steps, n)
    return treedef.unflatten([
        _schedule(record_steps, _tangents(path_name(path), leaf, n),
                  learning_rate) for path, leaf in flat])
  if isinstance(angles, RotationHistory):
    curves, steps = angles.curves, angles.steps
  elif isinstance(angles, Mapping):
    curves = {str(k): np.asarray(v, np.float64) for k, v in angles.items()}
  else:
    raise TypeError(
        f'Expected (steps, angles) from lx.step_angle_history, a '
        f'RotationHistory or a mapping path -> angles, got '
        f'{type(angles).__name__}.')
  n = len(next(iter(curves.values()))) if curves else 0
  record_steps = _check_steps(np.arange(n) if steps is None else steps, n)
  return _nested({name: _schedule(record_steps, _tangents(name, values, n),
                                  learning_rate)
                  for name, values in curves.items()})
