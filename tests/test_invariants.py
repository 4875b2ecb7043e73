"""Per-step invariants of every Layca optimizer: the norm is kept and each unit turns by atan(rate)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import layca_jax as lx
import reference as ref

OPTIMIZERS = {
    'sgd': lambda rate, **kw: lx.layca_sgd(rate, **kw),
    'sgd_momentum': lambda rate, **kw: lx.layca_sgd(rate, momentum=0.9, **kw),
    'sgd_nesterov': lambda rate, **kw: lx.layca_sgd(rate, momentum=0.9, nesterov=True, **kw),
    'adam': lambda rate, **kw: lx.layca_adam(rate, **kw),
    'rmsprop': lambda rate, **kw: lx.layca_rmsprop(rate, **kw),
    'adagrad': lambda rate, **kw: lx.layca_adagrad(rate, **kw),
}


def angle64(a, b):
  """Angle between two arrays, in float64, accurate for small angles."""
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  chord = np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))
  return 2 * np.arcsin(chord / 2)


def units(x, stack_axes, per_neuron):
  x = np.asarray(x, np.float64)
  return [x[idx] for idx in ref.unit_slices(x.shape, stack_axes, per_neuron)]


shapes = st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple)


@st.composite
def problems(draw):
  shape = draw(shapes)
  stack_axes = draw(st.integers(0, len(shape) - 2))
  per_neuron = draw(st.booleans()) and len(shape) - stack_axes >= 2
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=shape) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
  params = {'layer': {'kernel': kernel.astype(np.float32),
                      'bias': rng.normal(size=shape[-1:]).astype(np.float32)}}
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
           for _ in range(3)]
  multiplier = draw(st.sampled_from([None, 0.5, 2.0]))
  rate = draw(st.floats(0.01, 1.5))
  return params, grads, rate, stack_axes, per_neuron, multiplier


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
@settings(max_examples=5, deadline=None, derandomize=True)
@given(problem=problems())
def test_each_step_keeps_norms_and_turns_by_atan_rate(name, problem):
  params, grads, rate, stack_axes, per_neuron, multiplier = problem
  kw = dict(stack_axes={'layer': {'kernel': stack_axes, 'bias': 0}},
            per_neuron=per_neuron)
  if multiplier is not None:
    kw['multipliers'] = {'layer': {'kernel': multiplier, 'bias': None}}
  tx = OPTIMIZERS[name](rate, **kw)
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = params
  for g in grads:
    updates, state = update(g, state, p)
    new = optax.apply_updates(p, updates)
    expected = np.arctan(rate * (1.0 if multiplier is None else multiplier))
    for before, after, init in zip(
        units(p['layer']['kernel'], stack_axes, per_neuron),
        units(new['layer']['kernel'], stack_axes, per_neuron),
        units(params['layer']['kernel'], stack_axes, per_neuron)):
      np.testing.assert_allclose(np.linalg.norm(after), np.linalg.norm(init),
                                 rtol=1e-5)
      if before.size > 1 and np.linalg.norm(after - before) > 0:
        np.testing.assert_allclose(angle64(before, after), expected, rtol=1e-3)
    np.testing.assert_array_equal(new['layer']['bias'], p['layer']['bias'])
    p = new


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_non_layer_leaves_train_with_base_direction_when_asked(name):
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
            'bias': rng.normal(size=3).astype(np.float32)}
  grads = {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
           'bias': rng.normal(size=3).astype(np.float32)}
  tx = OPTIMIZERS[name](0.1, non_layer_learning_rate=0.01)
  updates, _ = tx.update(grads, tx.init(params), params)
  base = {
      'sgd': optax.sgd(0.01), 'sgd_momentum': optax.sgd(0.01, momentum=0.9),
      'sgd_nesterov': optax.sgd(0.01, momentum=0.9, nesterov=True),
      'adam': optax.adam(0.01), 'rmsprop': optax.rmsprop(0.01),
      'adagrad': optax.adagrad(0.01)}[name]
  want, _ = base.update(grads, base.init(params), params)
  np.testing.assert_allclose(updates['bias'], want['bias'], rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(shape=shapes, rate=st.floats(0.01, 2.0), seed=st.integers(0, 2 ** 16))
def test_layca_then_sgd_is_orthogonal_and_turns_by_atan_lr(shape, rate, seed):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  tx = optax.chain(lx.layca(), optax.sgd(rate))
  updates, _ = tx.update({'w': g}, tx.init({'w': w}), {'w': w})
  u = np.asarray(updates['w'], np.float64).ravel()
  w64 = w.astype(np.float64).ravel()
  if w.size == 1:  # A one-element layer has no tangent space: it cannot turn.
    np.testing.assert_array_equal(u, 0.0)
    return
  # Orthogonal to the layer, of length rate * |w|.
  assert abs(u @ w64) <= 1e-5 * np.linalg.norm(u) * np.linalg.norm(w64)
  np.testing.assert_allclose(np.linalg.norm(u), rate * np.linalg.norm(w64), rtol=1e-5)
  new = w64 + u
  np.testing.assert_allclose(angle64(w64, new), np.arctan(rate), rtol=1e-4)
  # Without keep_norm the norm grows by sqrt(1 + rate^2), as documented.
  np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(w64) * np.sqrt(1 + rate ** 2), rtol=1e-5)


def test_zero_step_stays_zero():
  params = {'w': jnp.eye(3)}
  tx = optax.chain(lx.layca(), optax.sgd(0.1), lx.keep_norm())
  updates, state = tx.update({'w': jnp.zeros((3, 3))}, tx.init(params), params)
  np.testing.assert_array_equal(updates['w'], 0.0)
  assert int(lx.skipped_steps(state)['w']) == 0


def test_step_parallel_to_weights_is_a_zero_rotation():
  w = jnp.arange(1.0, 7.0).reshape(2, 3)
  tx = optax.chain(lx.layca(), optax.sgd(0.5))
  updates, _ = tx.update({'w': 3.0 * w}, tx.init({'w': w}), {'w': w})
  assert float(jnp.abs(updates['w']).max()) <= 1e-5 * float(jnp.abs(w).max())


@pytest.mark.parametrize('name', ['sgd_momentum', 'adam'])
def test_bf16_params_keep_dtype_and_norm_over_200_steps(name):
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.bfloat16)},
            'dense': {'kernel': jnp.asarray(rng.normal(size=(32, 10)), jnp.bfloat16),
                      'bias': jnp.zeros(10, jnp.bfloat16)}}
  tx = OPTIMIZERS[name](0.1)
  state = tx.init(params)

  def step(carry, key):
    p, s = carry
    g = jax.tree.map(lambda x: jax.random.normal(key, x.shape, jnp.bfloat16), p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (final, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))(
      (params, state), jax.random.split(jax.random.PRNGKey(0), 200))
  for path in (('conv', 'kernel'), ('dense', 'kernel')):
    before = params[path[0]][path[1]]
    after = final[path[0]][path[1]]
    assert after.dtype == jnp.bfloat16
    n0 = np.linalg.norm(np.asarray(before, np.float64))
    n1 = np.linalg.norm(np.asarray(after, np.float64))
    # bf16 has an 8-bit mantissa: 2**-8 relative per element; norms average that out.
    assert abs(n1 / n0 - 1) < 2 ** -8, (path, n1 / n0)
  rotation = lx.layer_rotation(final, params)
  assert float(rotation['dense']['kernel']) > 0.5  # It did train.
