"""Per-step angles measured in-graph by ``lx.track_rotation(step_angles=True)``.

Reference: the angle between each unit's weights before and after every
step, computed on the host in float64 from the params trajectory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx

T = 12
STACK = {'blocks': 1}


def _params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {
      'Dense_0': {'kernel': jax.random.normal(keys[0], (5, 8)),
                  'bias': jnp.zeros(8)},
      # Two stacked 8x8 layers; neuron 3 of slice 1 is zero (a NaN unit).
      'blocks': {'kernel': jax.random.normal(keys[1], (2, 8, 8)).at[1, :, 3]
                 .set(0.0)},
      'Dense_1': {'kernel': jax.random.normal(keys[2], (8, 3)),
                  'bias': jnp.zeros(3)},
  }


def _loss(params, x, y):
  h = jnp.tanh(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  for i in range(2):
    h = jnp.tanh(h @ params['blocks']['kernel'][i])
  logits = h @ params['Dense_1']['kernel'] + params['Dense_1']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _units(x, path, per_neuron, steps=1):
  """float64 array ``(steps..., units..., size)``: each unit's weights as one
  row, after ``steps`` leading axes (a trajectory's time axis)."""
  x = np.asarray(x, np.float64)
  stack = steps + (1 if path == 'blocks/kernel' else 0)
  if per_neuron:
    x = np.moveaxis(x, -1, stack)  # (stack..., out, rest...)
    return x.reshape(x.shape[:stack + 1] + (-1,))
  return x.reshape(x.shape[:stack] + (-1,))


def _angle(before, after):
  """The angle between unit directions (NaN for a zero unit), float64."""
  with np.errstate(invalid='ignore', divide='ignore'):
    a = before / np.linalg.norm(before, axis=-1, keepdims=True)
    b = after / np.linalg.norm(after, axis=-1, keepdims=True)
    return 2 * np.arcsin(np.linalg.norm(a - b, axis=-1) / 2)


def _cosine_distance(now, init):
  with np.errstate(invalid='ignore', divide='ignore'):
    return 1 - np.sum(now * init, -1) / (np.linalg.norm(now, axis=-1)
                                         * np.linalg.norm(init, axis=-1))


LAYERS = ('Dense_0/kernel', 'blocks/kernel', 'Dense_1/kernel')


def _leaf(tree, path):
  a, b = path.split('/')
  return tree[a][b]


@pytest.fixture(scope='module')
def scanned_run():
  """A jitted ``lax.scan`` of SGD with momentum, carrying two tracking links
  placed last: whole layers, and per neuron with the spread."""
  params = _params()
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(T, 16, 5)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 3, size=(T, 16)))
  sgd = optax.sgd(0.3, momentum=0.9)
  layers = optax.chain(sgd, lx.track_rotation(history=T, step_angles=True,
                                              stack_axes=STACK))
  neurons = lx.track_rotation(history=T, step_angles=True, per_neuron=True,
                              spread=True, stack_axes=STACK)

  def body(carry, batch):
    params, s_layers, s_neurons = carry
    grads = jax.grad(_loss)(params, *batch)
    updates, s_layers = layers.update(grads, s_layers, params)
    _, s_neurons = neurons.update(updates, s_neurons, params)
    return (optax.apply_updates(params, updates), s_layers, s_neurons), params

  (final, s_layers, s_neurons), seen = jax.jit(
      lambda c: jax.lax.scan(body, c, (xs, ys)))(
          (params, layers.init(params), neurons.init(params)))
  trajectory = jax.tree.map(lambda s, f: np.concatenate([s, f[None]]), seen,
                            final)
  return trajectory, s_layers, s_neurons


def test_step_angles_equal_the_angle_of_each_applied_step(scanned_run):
  trajectory, state, _ = scanned_run
  steps, angles = lx.step_angle_history(state)
  rot_steps, rotations = lx.rotation_history(state)
  np.testing.assert_array_equal(steps, np.arange(T))
  np.testing.assert_array_equal(rot_steps, steps)  # one buffer, one clock
  assert angles['Dense_0']['bias'] is None
  for path in LAYERS:
    w = _units(_leaf(trajectory, path), path, False)  # (T + 1, layers..., n)
    want = _angle(w[:-1], w[1:])
    assert want.min() > 1e-3  # every step turned every layer
    np.testing.assert_allclose(_leaf(angles, path), want, rtol=2e-5)
    np.testing.assert_allclose(_leaf(rotations, path),
                               _cosine_distance(w[:-1], w[0]), atol=1e-6)
  np.testing.assert_allclose(
      lx.tracked_step_angle(state)['Dense_1']['kernel'],
      angles['Dense_1']['kernel'][-1])


def test_spread_is_min_median_max_over_neurons_without_nan_units(scanned_run):
  trajectory, _, state = scanned_run
  _, spreads = lx.step_angle_history(state)
  _, rotation_spreads = lx.rotation_history(state)
  for path in LAYERS:
    w = _units(_leaf(trajectory, path), path, True)
    per_neuron = _angle(w[:-1], w[1:])      # (T, stack..., neurons)
    rotation = _cosine_distance(w[:-1], w[0])
    got, got_rotation = _leaf(spreads, path), _leaf(rotation_spreads, path)
    assert isinstance(got, lx.NeuronSpread)
    for field, reduce in (('min', np.nanmin), ('median', np.nanmedian),
                          ('max', np.nanmax)):
      np.testing.assert_allclose(getattr(got, field),
                                 reduce(per_neuron, axis=-1), rtol=2e-5)
      np.testing.assert_allclose(getattr(got_rotation, field),
                                 reduce(rotation, axis=-1), atol=1e-6)
    if path == 'blocks/kernel':
      # The neuron that is zero at init has no angle at step 0 and no
      # rotation ever: left out, the spread stays finite.
      assert np.isnan(per_neuron[0, 1, 3])
      assert np.all(np.isnan(rotation[:, 1, 3]))
  blocks = spreads['blocks']['kernel']
  assert np.all(np.isfinite(blocks.min)) and np.all(np.isfinite(
      rotation_spreads['blocks']['kernel'].median))

  # Logger-ready keys in depth order; a stacked leaf spreads per slice.
  stats = ('min', 'median', 'max')
  want = ([f'angle/Dense_0/kernel/{s}' for s in stats]
          + [f'angle/blocks/kernel/{i}/{s}' for i in (0, 1) for s in stats]
          + [f'angle/Dense_1/kernel/{s}' for s in stats])
  flat = lx.flatten_rotations(lx.tracked_step_angle(state), order=list(LAYERS),
                              prefix='angle/')
  assert list(flat) == want
  assert flat['angle/blocks/kernel/1/max'] == pytest.approx(
      float(blocks.max[-1, 1]))
  history = lx.RotationHistory(order=list(LAYERS))
  history.extend(*lx.step_angle_history(state))
  assert list(history.curves) == [k[len('angle/'):] for k in want]
  np.testing.assert_array_equal(history.curves['blocks/kernel/1/max'],
                                blocks.max[:, 1])


def test_every_k_records_the_step_taken_at_each_recorded_step():
  params = {'k': jnp.eye(3)}
  tx = optax.chain(optax.sgd(1.0), lx.track_rotation(every=3, history=2,
                                                     step_angles=True))
  update = jax.jit(tx.update)
  state = tx.init(params)
  want = {}
  for t in range(8):
    grads = {'k': -0.1 * (t + 1) * jnp.ones((3, 3))}
    updates, state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    if t % 3 == 0:
      want[t] = float(_angle(_units(params['k'], 'k', False, steps=0),
                             _units(new['k'], 'k', False, steps=0)))
    params = new
  steps, angles = lx.step_angle_history(state)
  assert steps.tolist() == [3, 6]
  np.testing.assert_allclose(angles['k'], [want[3], want[6]], rtol=1e-5)
  np.testing.assert_allclose(lx.tracked_step_angle(state)['k'], want[6],
                             rtol=1e-5)


def test_clear_errors():
  params = {'k': jnp.eye(2)}
  plain = lx.track_rotation(history=2).init(params)
  with pytest.raises(ValueError, match='step_angles=True'):
    lx.tracked_step_angle(plain)
  with pytest.raises(ValueError, match='step_angles=True'):
    lx.step_angle_history(plain)
  with pytest.raises(ValueError, match='history=N'):
    lx.step_angle_history(lx.track_rotation(step_angles=True).init(params))
  with pytest.raises(ValueError, match='per_neuron'):
    lx.track_rotation(spread=True)
