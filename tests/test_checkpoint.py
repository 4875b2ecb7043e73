"""Checkpoints: every state of the library saves and restores with
orbax-checkpoint, and a resumed run is bit-identical to an uninterrupted one;
the same seed gives bit-identical results (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import layca_jax as lx

RATE = 0.1
STEPS, SAVE_AT = 4, 2

# Every state the library makes (layca, keep_norm, each optimizer with its
# base state, track_rotation with and without history), inside the chains and
# wrappers users build.
STATES = {
    'links': lambda: optax.chain(lx.layca(per_neuron=True), optax.sgd(RATE),
                                 lx.keep_norm(per_neuron=True)),
    'layca_sgd': lambda: lx.layca_sgd(RATE, momentum=0.9),
    'layca_adam': lambda: optax.apply_if_finite(
        lx.layca_adam(optax.cosine_decay_schedule(RATE, 10)), 3),
    'layca_rmsprop': lambda: optax.chain(
        lx.layca_rmsprop(RATE, non_layer_learning_rate=RATE),
        lx.track_rotation(every=2, history=2)),
    'layca_adagrad': lambda: optax.chain(
        lx.track_rotation(per_neuron=True), lx.layca_adagrad(RATE)),
}

def init_params(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      'Conv_0': {'kernel': jax.random.normal(k1, (3, 3, 2, 4)),
                 'bias': jnp.zeros(4)},
      'Dense_0': {'kernel': jax.random.normal(k2, (36, 5)),
                  'bias': 0.1 * jax.random.normal(k3, (5,))},
      'count': jnp.zeros((), jnp.int32),
  }


def loss(params, step):
  x = jnp.sin(jnp.arange(36.0) * (step + 1.0))
  h = jnp.tanh(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  return (jnp.sum(h ** 2) + jnp.sum(params['Conv_0']['kernel'] ** 3)
          + jnp.sum(params['Conv_0']['bias']))


def make_step(tx):
  @jax.jit
  def step(params, state, i):
    grads = jax.grad(loss, allow_int=True)(params, i)
    grads['count'] = jnp.zeros((), jnp.int32)  # float0 cannot be saved or added
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def run(step, params, state, start, stop):
  for i in range(start, stop):
    params, state = step(params, state, i)
  return params, state


def assert_bit_identical(a, b):
  a_leaves, a_def = jax.tree.flatten(a)
  b_leaves, b_def = jax.tree.flatten(b)
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_and_restore(path, tree):
  """Saves with orbax and restores into the same structure (None leaves and
  NamedTuple states included) from an abstract target."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return checkpointer.restore(path, abstract)


@pytest.mark.parametrize('name', STATES)
def test_a_resumed_run_is_bit_identical(name, tmp_path):
  tx = STATES[name]()
  step = make_step(tx)
  params = init_params(0)
  straight = run(step, params, tx.init(params), 0, STEPS)

  first = run(step, params, tx.init(params), 0, SAVE_AT)
  restored = save_and_restore(tmp_path / 'checkpoint', {'params': first[0],
                                                        'opt_state': first[1]})
  assert_bit_identical(restored, {'params': first[0], 'opt_state': first[1]})
  resumed = run(step, restored['params'], restored['opt_state'], SAVE_AT,
                STEPS)
  assert_bit_identical(resumed, straight)
  moved = lx.step_rotation(params, straight[0])
  assert float(moved['Dense_0']['kernel']) > 0.01


def test_readers_work_on_a_restored_state(tmp_path):
  tx = STATES['layca_rmsprop']()
  params = init_params(0)
  params, state = run(make_step(tx), params, tx.init(params), 0, 5)
  restored = save_and_restore(tmp_path / 'checkpoint', state)
  steps, rotations = lx.rotation_history(restored)
  expected_steps, expected = lx.rotation_history(state)
  np.testing.assert_array_equal(steps, expected_steps)
  assert steps.tolist() == [2, 4]
  assert_bit_identical(rotations, expected)
  assert_bit_identical(lx.tracked_rotation(restored), lx.tracked_rotation(state))
  assert_bit_identical(lx.skipped_steps(restored), lx.skipped_steps(state))
  assert_bit_identical(lx.norm_drift(restored), lx.norm_drift(state))


def test_the_same_seed_gives_bit_identical_results():
  results = []
  for _ in range(2):  # Built, initialised and compiled afresh each time.
    tx = optax.chain(lx.layca_adam(RATE, per_neuron=True),
                     lx.track_rotation(history=2))
    params = init_params(0)
    step = make_step(tx)
    results.append(run(step, params, tx.init(params), 0, STEPS))
  assert_bit_identical(results[0], results[1])
  other = run(step, init_params(1), tx.init(init_params(1)), 0, STEPS)
  assert not np.array_equal(other[0]['Dense_0']['kernel'],
                            results[0][0]['Dense_0']['kernel'])
