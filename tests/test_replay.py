"""Measure, then match: ``lx.replay_multipliers`` and schedule multipliers.

A recorded SGD-with-momentum run of an MLP on scikit-learn's digits gives
per-layer per-step angles (measured in-graph, ``track_rotation`` last in
the chain). Layca with ``replay_multipliers`` then turns every layer by the
recorded angle at every step. What that reproduces:

* per-step angles, always (any gradients, any base optimizer): checked;
* the per-layer cosine-distance curves (rotation from init) only when Layca
  is driven by the recorded run's own base directions, here its gradients
  with the same momentum: Layca's step then lies in the same plane as the
  recorded step, turns by the same angle, and the weight directions follow
  the recorded ones exactly (norms aside: Layca keeps them). Checked to
  1e-5 (the issue asks 1e-3) over all steps.

With its own gradients (same init, same batches) the Layca run's curves
differ, since its steps point elsewhere; that gap is measured in the README,
not asserted here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import layca_jax as lx

T = 40
LR, MOMENTUM = 0.1, 0.9
LAYERS = ('Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel')


def _init(seed=0):
  sizes = (64, 32, 16, 10)
  keys = jax.random.split(jax.random.key(seed), 3)
  return {f'Dense_{i}': {'kernel': jax.random.normal(k, (a, b)) / np.sqrt(a),
                         'bias': jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _loss(params, x, y):
  for i in range(3):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    if i < 2:
      x = jax.nn.relu(x)
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def _leaf(tree, path):
  a, b = path.split('/')
  return tree[a][b]


def _rows(trajectory, path):
  w = np.asarray(_leaf(trajectory, path), np.float64)
  return w.reshape(len(w), -1)


def _cosine_distances(trajectory, path):
  """float64 cosine distance from init at every step of a trajectory."""
  w = _rows(trajectory, path)
  return 1 - w @ w[0] / (np.linalg.norm(w, axis=1) * np.linalg.norm(w[0]))


def _step_angles(trajectory, path):
  """float64 angle of every step of a trajectory."""
  w = _rows(trajectory, path)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  return 2 * np.arcsin(np.linalg.norm(w[1:] - w[:-1], axis=1) / 2)


def _scan(tx, params, inputs, grad_fn):
  """Runs ``tx`` over ``inputs`` in one jitted scan: (trajectory of T + 1
  params, final state, the gradients used)."""
  def body(carry, inp):
    params, state = carry
    grads = grad_fn(params, inp)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), (params, grads)

  (final, state), (seen, grads) = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), inputs))(params, tx.init(params))
  trajectory = jax.tree.map(lambda s, f: np.concatenate([s, f[None]]), seen,
                            final)
  return trajectory, state, grads


def _own_grads(params, batch):
  return jax.grad(_loss)(params, *batch)


@pytest.fixture(scope='module')
def recorded():
  """SGD with momentum, 40 steps of batch 64 on digits, angles in-graph."""
  digits = load_digits()
  index = np.random.default_rng(0).integers(0, len(digits.target), (T, 64))
  batches = (jnp.asarray(digits.data[index] / 16.0, jnp.float32),
             jnp.asarray(digits.target[index]))
  tx = optax.chain(optax.sgd(LR, momentum=MOMENTUM),
                   lx.track_rotation(history=T, step_angles=True))
  trajectory, state, grads = _scan(tx, _init(), batches, _own_grads)
  return trajectory, lx.step_angle_history(state), grads, batches


def test_replay_on_the_recorded_directions_gives_its_rotation_curves(recorded):
  trajectory, history, grads, _ = recorded
  multipliers = lx.replay_multipliers(history, learning_rate=0.5)
  tx = lx.layca_sgd(0.5, momentum=MOMENTUM, multipliers=multipliers)
  replayed, _, _ = _scan(tx, _init(), grads, lambda _, g: g)
  for path in LAYERS:
    want = _cosine_distances(trajectory, path)
    assert want[-1] > 0.05  # the recorded run turned every layer
    np.testing.assert_allclose(_cosine_distances(replayed, path), want,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(_step_angles(replayed, path),
                               _leaf(history[1], path), rtol=1e-4)
    norms = np.linalg.norm(_rows(replayed, path), axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # Layca's sphere
    recorded_norms = np.linalg.norm(_rows(trajectory, path), axis=1)
    assert abs(recorded_norms[-1] / recorded_norms[0] - 1) > 1e-3


def test_replay_on_its_own_gradients_turns_each_step_by_the_recorded_angle(
    recorded):
  _, history, _, batches = recorded
  tx = lx.layca_sgd(LR, momentum=MOMENTUM,
                    multipliers=lx.replay_multipliers(history, LR))
  replayed, _, _ = _scan(tx, _init(), batches, _own_grads)
  for path in LAYERS:
    np.testing.assert_allclose(_step_angles(replayed, path),
                               _leaf(history[1], path), rtol=1e-4)


def test_an_edited_profile_is_replayed(recorded):
  """Evened out across layers (the paper's layer-wise study), from a
  RotationHistory keeping every other step: every layer turns by the mean
  angle, odd steps by the interpolated tangent."""
  _, (steps, angles), grads, _ = recorded
  history = lx.RotationHistory()
  history.extend(steps[::2], jax.tree.map(lambda a: a[::2], angles))
  mean = np.mean(list(history.curves.values()), axis=0)
  even = lx.replay_multipliers({name: mean for name in history.curves},
                               learning_rate=LR, steps=history.steps)
  tangent = np.tan(mean)
  between = (tangent[:-1] + tangent[1:]) / 2
  want = np.arctan(np.insert(tangent, np.arange(1, len(mean)), between))
  want = np.append(want, np.arctan(tangent[-1]))  # held after the last record
  trajectory, state, _ = _scan(lx.layca_sgd(LR, multipliers=even), _init(),
                               grads, lambda _, g: g)
  for path in LAYERS:
    np.testing.assert_allclose(_step_angles(trajectory, path), want,
                               rtol=1e-4)
  assert int(state.count) == int(state.layca.count) == T


def test_schedule_leaves_are_read_at_the_link_step_count_and_checked():
  """The ``layca`` link counts its steps; a callable ``multipliers`` still
  means a function of the params (here returning schedules)."""
  params = {'a': {'kernel': jnp.eye(3)}, 'b': {'kernel': jnp.eye(3)}}
  grads = {'a': {'kernel': jnp.ones((3, 3))}, 'b': {'kernel': jnp.ones((3, 3))}}
  schedules = {'a': {'kernel': lambda count: 0.5 * (count + 1)},
               'b': {'kernel': 2.0}}
  tx = optax.chain(lx.layca(multipliers=lambda p: schedules), optax.sgd(0.1),
                   lx.keep_norm())
  trajectory, state, _ = _scan(tx, params, jax.tree.map(
      lambda g: jnp.stack([g] * 3), grads), lambda _, g: g)
  np.testing.assert_allclose(_step_angles(trajectory, 'a/kernel'),
                             np.arctan(0.1 * 0.5 * np.arange(1, 4)), rtol=1e-5)
  np.testing.assert_allclose(_step_angles(trajectory, 'b/kernel'),
                             np.arctan(0.2), rtol=1e-5)
  assert int(state[0].count) == 3
  negative = {'a': {'kernel': lambda count: -1.0}}
  with pytest.raises(ValueError, match="'a/kernel'"):
    lx.layca_sgd(0.1, multipliers=negative).init(params)
  with pytest.raises(ValueError, match="'a/kernel'"):
    lx.layca(multipliers=negative).init(params)


def test_replay_multipliers_forms_interpolation_and_errors():
  steps = np.array([0, 4])
  angles = np.array([[0.1, 0.2], [0.3, 0.0]])   # per-unit: 2 units
  m = lx.replay_multipliers((steps, {'k': angles, 'b': None}), 0.5)
  assert m['b'] is None
  tangent = np.tan(angles) / 0.5
  for count, want in [(0, tangent[0]),
                      (1, 0.75 * tangent[0] + 0.25 * tangent[1]),
                      (4, tangent[1]), (9, tangent[1])]:
    np.testing.assert_allclose(m['k'](count), want, rtol=1e-6)
  # A rate schedule divides in-graph; a mapping nests by path.
  m = lx.replay_multipliers({'x/kernel': [0.1, 0.2]}, lambda c: 0.1 * (c + 1))
  np.testing.assert_allclose(m['x']['kernel'](1), np.tan(0.2) / 0.2, rtol=1e-6)

  with pytest.raises(ValueError, match="'x/kernel'.*NaN"):
    lx.replay_multipliers({'x/kernel': [0.1, np.nan]})
  with pytest.raises(ValueError, match=r"'x/kernel'.*\[0, pi/2\)"):
    lx.replay_multipliers({'x/kernel': [0.1, 1.6]})
  with pytest.raises(ValueError, match='increasing'):
    lx.replay_multipliers({'x/kernel': [0.1, 0.2]}, steps=[3, 3])
  with pytest.raises(ValueError, match='positive'):
    lx.replay_multipliers({'x/kernel': [0.1]}, learning_rate=0.0)
  spread = lx.NeuronSpread(np.zeros(2), np.zeros(2), np.zeros(2))
  with pytest.raises(ValueError, match='spread'):
    lx.replay_multipliers((np.arange(2), {'k': spread}))
