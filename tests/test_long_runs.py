"""Long runs: 20,000 steps of SGD-Layca with momentum hold every layer's norm.

Each run is one ``jit`` around a ``lax.scan`` over the steps, so it takes
seconds; the norm of every layer is measured after every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx

STEPS = 20_000
RATE = 3.0 ** -3
LAYERS = ('Conv_0', 'Dense_0', 'Dense_1')


def small_params(dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  return {
      'Conv_0': {'kernel': jax.random.normal(keys[0], (3, 3, 2, 4)).astype(dtype),
                 'bias': jnp.zeros(4, dtype)},
      'Dense_0': {'kernel': jax.random.normal(keys[1], (16, 8)).astype(dtype),
                  'bias': jnp.zeros(8, dtype)},
      'Dense_1': {'kernel': (3.0 * jax.random.normal(keys[2], (8, 3))).astype(dtype)},
  }


def f32_norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


@jax.jit
def long_run(params):
  """``STEPS`` steps of ``layca_sgd(momentum=0.9)`` on noisy gradients.

  The gradient pulls each layer towards a fixed target direction, plus noise,
  so that momentum accumulates and layers keep turning. Returns the final
  params and, per step, each layer's relative norm error ``|w|/|w0| - 1``.
  """
  tx = lx.layca_sgd(RATE, momentum=0.9)
  targets = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape),
                         params)
  phases = jax.tree.map(lambda x: jax.random.uniform(jax.random.key(8), x.shape,
                                                     maxval=100.0), params)
  initial = {k: f32_norm(params[k]['kernel']) for k in LAYERS}

  def step(carry, i):
    params, state = carry
    # Deterministic noise, cheaper than drawing random numbers every step.
    grads = jax.tree.map(
        lambda w, t, p: (w.astype(jnp.float32) - t + 2.0 * jnp.sin(p * i)
                         ).astype(w.dtype), params, targets, phases)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    errors = jnp.stack([f32_norm(params[k]['kernel']) / initial[k] - 1.0
                        for k in LAYERS])
    return (params, state), errors

  (final, state), errors = jax.lax.scan(step, (params, tx.init(params)),
                                        jnp.arange(STEPS))
  return final, errors, lx.skipped_steps(state)


@pytest.fixture(scope='module', params=[jnp.float32, jnp.bfloat16],
                ids=['float32', 'bfloat16'])
def run(request):
  params = small_params(request.param)
  final, errors, skipped = long_run(params)
  return params, final, np.asarray(errors, np.float64), skipped


def test_every_layer_turned_far(run):
  params, final, _, skipped = run
  rotation = lx.layer_rotation(final, params)
  for layer in LAYERS:
    assert float(rotation[layer]['kernel']) > 0.3, layer
    assert int(skipped[layer]['kernel']) == 0


def test_non_layer_leaves_stay_frozen(run):
  params, final, _, _ = run
  for layer in ('Conv_0', 'Dense_0'):
    np.testing.assert_array_equal(final[layer]['bias'], params[layer]['bias'])


def test_float32_norms_hold_to_1e5_at_every_step(run):
  params, final, errors, _ = run
  if params['Conv_0']['kernel'].dtype != jnp.float32:
    pytest.skip('float32 only')
  assert np.all(np.isfinite(errors))
  assert np.max(np.abs(errors)) < 1e-5, np.max(np.abs(errors), axis=0)
  for layer in LAYERS:  # The final norms, measured in float64 on the host.
    n = np.linalg.norm(np.asarray(final[layer]['kernel'], np.float64))
    n0 = np.linalg.norm(np.asarray(params[layer]['kernel'], np.float64))
    assert abs(n / n0 - 1) < 1e-5, layer


def test_bfloat16_norms_hold_to_bfloat16_precision_without_drift(run):
  params, _, errors, _ = run
  if params['Conv_0']['kernel'].dtype != jnp.bfloat16:
    pytest.skip('bfloat16 only')
  assert np.all(np.isfinite(errors))
  # Rounding each weight to bfloat16 (8 significant bits) moves the norm by
  # at most half a unit in the last place, 2**-9, relative.
  assert np.max(np.abs(errors)) <= 2.0 ** -8, np.max(np.abs(errors), axis=0)
  # No drift: the mean error of the last tenth of the run is that of the
  # first tenth, within the spread of the errors.
  tenth = STEPS // 10
  first, last = errors[:tenth].mean(axis=0), errors[-tenth:].mean(axis=0)
  spread = errors.std(axis=0)
  assert np.all(np.abs(last - first) < np.maximum(spread, 2.0 ** -12)), (
      first, last, spread)
