"""lx.track_rotation and its readers, and the host-side RotationHistory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _data(seed=0, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
          jnp.asarray(rng.integers(0, 3, size=n)))


def _loss(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _assert_trees_close(got, want, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=atol)
  assert jax.tree.structure(got) == jax.tree.structure(want)


def test_jitted_flax_loop_records_rotation_of_params_passed_to_update():
  model = _MLP()
  x, y = _data()
  params = model.init(jax.random.key(0), x)['params']
  init_params = params
  tx = optax.chain(optax.sgd(0.5, momentum=0.9), lx.track_rotation())
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: _loss(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(4):
    seen = params
    params, state = step(params, state)
    want = lx.layer_rotation(seen, init_params)
    assert want['Dense_0']['bias'] is None
    _assert_trees_close(lx.tracked_rotation(state), want)
  assert float(lx.tracked_rotation(state)['Dense_0']['kernel']) > 0


def test_scan_loop_history_equals_host_side_rotations():
  model = _MLP()
  x, y = _data(1)
  params0 = model.init(jax.random.key(1), x)['params']
  tx = optax.chain(lx.track_rotation(history=8, per_neuron=True),
                   optax.adam(0.05))

  def body(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: _loss(model, p, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), params

  (_, state), seen = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), length=6))(params0, tx.init(params0))
  steps, rotations = lx.rotation_history(state)
  np.testing.assert_array_equal(steps, np.arange(6))
  for t in range(6):
    params_t = jax.tree.map(lambda s, t=t: s[t], seen)
    want = lx.layer_rotation(params_t, params0, per_neuron=True)
    _assert_trees_close(jax.tree.map(lambda r, t=t: r[t], rotations), want)
  assert rotations['Dense_1']['kernel'].shape == (6, 3)


def test_every_k_records_only_every_k_steps_and_ring_buffer_keeps_last():
  params = {'k': jnp.eye(3)}
  tx = lx.track_rotation(every=3, history=2)
  state = tx.init(params)
  recorded = {}
  for t in range(8):
    current = {'k': jnp.eye(3) + 0.1 * t * jnp.ones((3, 3))}
    _, state = tx.update(current, state, current)
    if t % 3 == 0:
      recorded[t] = float(lx.layer_rotation(current, params)['k'])
    # Between records the stored value is the last record's.
    np.testing.assert_allclose(lx.tracked_rotation(state)['k'],
                               recorded[max(recorded)], atol=1e-7)
  steps, rotations = lx.rotation_history(state)
  assert steps.tolist() == [3, 6]
  np.testing.assert_allclose(rotations['k'], [recorded[3], recorded[6]],
                             atol=1e-7)
  assert int(state.count) == 8


def test_readers_find_the_state_at_any_depth():
  params = {'k': jnp.ones((2, 2)), 'b': jnp.ones(2)}
  grads = {'k': jnp.array([[1., -1.], [0., 2.]]), 'b': jnp.ones(2)}
  txs = [
      optax.chain(optax.sgd(0.1), optax.chain(lx.track_rotation(history=3))),
      optax.inject_hyperparams(
          lambda learning_rate: optax.chain(optax.sgd(learning_rate),
                                            lx.track_rotation(history=3)))(
                                                learning_rate=0.1),
      lx.layca_sgd(0.1),  # no tracking state: a clear error
  ]
  for tx in txs[:2]:
    state = tx.init(params)
    for _ in range(2):
      new_params = optax.apply_updates(params, tx.update(grads, state, params)[0])
      _, state = tx.update(grads, state, new_params)
    wrapped = {'opt': state, 'other': (1, 2)}
    want = lx.layer_rotation(new_params, params)
    np.testing.assert_allclose(lx.tracked_rotation(wrapped)['k'], want['k'],
                               atol=1e-7)
    assert lx.tracked_rotation(wrapped)['b'] is None
    assert lx.rotation_history(wrapped)[0].tolist() == [0, 1]
  with pytest.raises(ValueError, match='track_rotation'):
    lx.tracked_rotation(txs[2].init(params))
  no_history = lx.track_rotation()
  with pytest.raises(ValueError, match='history=N'):
    lx.rotation_history(no_history.init(params))


def test_state_holds_one_copy_of_the_params_and_needs_them_in_update():
  params = {'k': jnp.ones((4, 4)), 'b': jnp.ones(4)}
  tx = lx.track_rotation(history=5)
  state = tx.init(params)
  big = [x for x in jax.tree.leaves(state) if np.size(x) >= 16]
  assert len(big) == 1   # init_params['k'] only: a copy, in a buffer of its own.
  np.testing.assert_array_equal(big[0], params['k'])
  assert big[0].unsafe_buffer_pointer() != params['k'].unsafe_buffer_pointer()
  assert state.history['k'].shape == (5,)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, state)
  updates, _ = tx.update({'k': 2 * jnp.ones((4, 4)), 'b': jnp.ones(4)},
                         state, params)
  np.testing.assert_array_equal(updates['k'], 2.0)  # passes updates through
  with pytest.raises(ValueError, match='every'):
    lx.track_rotation(every=0)
  with pytest.raises(ValueError, match='history'):
    lx.track_rotation(history=0)


def test_rotation_history_records_saves_and_loads(tmp_path):
  history = lx.RotationHistory()
  for step, scale in [(0, 0.0), (10, 0.5), (20, 1.0)]:
    history.record(step, {'Dense_10': {'kernel': jnp.asarray(scale)},
                          'Dense_2': {'kernel': jnp.asarray([scale, 2 * scale]),
                                      'bias': None}})
  assert list(history.curves) == ['Dense_2/kernel/0', 'Dense_2/kernel/1',
                                  'Dense_10/kernel']
  np.testing.assert_array_equal(history.curves['Dense_2/kernel/1'], [0, 1, 2])
  path = tmp_path / 'history.npz'
  history.save(path)
  with np.load(path, allow_pickle=False) as data:  # no pickled objects
    assert set(data.files) >= {'steps', 'names', 'values'}
  loaded = lx.RotationHistory.load(path)
  np.testing.assert_array_equal(loaded.steps, [0, 10, 20])
  assert list(loaded.curves) == list(history.curves)
  for name, values in history.curves.items():
    np.testing.assert_array_equal(loaded.curves[name], values)
  loaded.record(30, {'Dense_10': {'kernel': 0.7}, 'Dense_2': {'kernel': [1, 2]}})
  assert len(loaded) == 4


def test_rotation_history_order_and_extend_from_state():
  params = {'z_first': jnp.eye(2), 'a_last': jnp.eye(2)}
  tx = lx.track_rotation(history=4)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  history = lx.RotationHistory(order=['z_first', 'a_last'])
  history.extend(*lx.rotation_history(state))
  assert list(history.curves) == ['z_first', 'a_last']
  assert history.steps.tolist() == [0, 1, 2]
