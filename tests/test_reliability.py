"""Reliability: bad input fails early naming the leaf, non-finite steps are
skipped per layer, extreme finite scales stay finite and on the sphere, and an
empty pytree is a no-op everywhere."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx
from conftest import flax_like_params

RATE = 0.1

# Every transform of the library that updates params, by name.
TRANSFORMS = {
    'links': lambda multipliers=None, **kw: optax.chain(
        lx.layca(multipliers=multipliers, **kw), optax.sgd(RATE),
        lx.keep_norm(**kw)),
    'keep_norm': lambda **kw: optax.chain(optax.sgd(RATE), lx.keep_norm(**kw)),
    'layca_sgd': lambda **kw: lx.layca_sgd(RATE, momentum=0.9, **kw),
    'layca_adam': lambda **kw: lx.layca_adam(RATE, **kw),
    'layca_rmsprop': lambda **kw: lx.layca_rmsprop(RATE, **kw),
    'layca_adagrad': lambda **kw: lx.layca_adagrad(RATE, **kw),
}
# Those that hold a layca state (skipped steps are counted there).
WITH_LAYCA = ['links', 'layca_sgd', 'layca_adam', 'layca_rmsprop',
              'layca_adagrad']
# A cheaper sample for the checks that compile a new program per transform:
# the chain of links, momentum, and the base direction that squares.
SAMPLE = ['links', 'layca_sgd', 'layca_adam']
OPTIMIZERS = {
    'layca_sgd': lx.layca_sgd,
    'layca_adam': lx.layca_adam,
    'layca_rmsprop': lx.layca_rmsprop,
    'layca_adagrad': lx.layca_adagrad,
}
# One instance and one jitted update each, shared by the tests so that each
# compiles once per input signature (errors are raised while tracing).
TX = {name: make() for name, make in TRANSFORMS.items()}
UPDATE = {name: jax.jit(tx.update) for name, tx in TX.items()}
step_rotation = jax.jit(lx.step_rotation)
layer_rotation = jax.jit(lx.layer_rotation)


def as_jax(tree, dtype=None):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def gradients(params, seed=1, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      (jax.random.normal(k, jnp.shape(x)) * scale).astype(jnp.asarray(x).dtype)
      for k, x in zip(keys, leaves)])


def float64_norm(x) -> float:
  return float(np.linalg.norm(np.asarray(jnp.asarray(x, jnp.float32),
                                         np.float64)))


@pytest.fixture
def params():
  return as_jax(flax_like_params())


# ---------------------------------------------------------------------------
# Updates that do not fit the params.


@pytest.mark.parametrize('name', TRANSFORMS)
def test_updates_with_a_missing_leaf_name_the_path(name, params):
  state = TX[name].init(params)
  grads = gradients(params)
  del grads['Conv_1']['kernel']
  with pytest.raises(ValueError, match=r"Missing paths: \['Conv_1/kernel'\]"):
    UPDATE[name](grads, state, params)


@pytest.mark.parametrize('name', TRANSFORMS)
@pytest.mark.parametrize('path, shape', [
    (('Dense_0', 'kernel'), (10, 72)),   # transposed
    (('Dense_0', 'kernel'), (1, 10)),    # would broadcast silently
    (('Conv_0', 'bias'), (1,)),          # a non-layer leaf, too
])
def test_updates_of_another_shape_name_the_path(name, path, shape, params):
  state = TX[name].init(params)
  grads = gradients(params)
  grads[path[0]][path[1]] = jnp.ones(shape)
  expected = tuple(params[path[0]][path[1]].shape)
  with pytest.raises(ValueError, match=(
      rf"'{path[0]}/{path[1]}' has shape \({shape[0]}.*expected "
      rf"\({expected[0]}")):
    UPDATE[name](grads, state, params)  # Checked while tracing.


@pytest.mark.parametrize('name', TRANSFORMS)
@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_])
def test_non_floating_updates_for_floating_params_are_type_errors(
    name, dtype, params):
  # optax.sgd would cast the integers before keep_norm sees them.
  tx = lx.keep_norm() if name == 'keep_norm' else TX[name]
  state = tx.init(params)
  grads = gradients(params)
  grads['Conv_1']['kernel'] = grads['Conv_1']['kernel'].astype(dtype)
  with pytest.raises(TypeError, match="'Conv_1/kernel' has dtype .*floating"):
    jax.eval_shape(tx.update, grads, state, params)


@pytest.mark.parametrize('name', SAMPLE + ['keep_norm'])
def test_float32_updates_for_bfloat16_params_are_accepted(name, params):
  """Mixed precision: float32 gradients of bfloat16 params is common."""
  params = as_jax(params, jnp.bfloat16)
  state = TX[name].init(params)
  grads = as_jax(gradients(params), jnp.float32)
  updates, _ = UPDATE[name](grads, state, params)
  new = optax.apply_updates(params, updates)
  for path in ('Conv_0', 'Conv_1', 'Dense_0'):
    assert new[path]['kernel'].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(new[path]['kernel'].astype(jnp.float32))))
    n, n0 = float64_norm(new[path]['kernel']), float64_norm(params[path]['kernel'])
    assert abs(n / n0 - 1) < 2.0 ** -7, path


# ---------------------------------------------------------------------------
# Params that do not fit the state made at init.


@pytest.mark.parametrize('name', TRANSFORMS)
def test_params_with_another_structure_than_at_init_name_the_path(
    name, params):
  state = TX[name].init(params)
  params = dict(params, Dense_1=params['Dense_0'])
  with pytest.raises(ValueError, match=(
      r"init.*structure of params.*Missing paths: \['Dense_1/bias', "
      r"'Dense_1/kernel'\]")):
    UPDATE[name](gradients(params), state, params)


@pytest.mark.parametrize('name', TRANSFORMS)
def test_a_layer_that_became_integer_since_init_names_the_path(name, params):
  state = TX[name].init(params)
  grads = gradients(params)
  params['Conv_1']['kernel'] = params['Conv_1']['kernel'].astype(jnp.int32)
  with pytest.raises(ValueError, match="'Conv_1/kernel' are not a layer now"):
    UPDATE[name](grads, state, params)


@pytest.mark.parametrize('name', ['links', 'keep_norm'])
def test_per_neuron_units_that_changed_since_init_name_the_path(name, params):
  tx = TRANSFORMS[name](per_neuron=True)
  state = tx.init(params)
  params['Dense_0']['kernel'] = jnp.ones((72, 12))
  params['Dense_0']['bias'] = jnp.ones(12)
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' have \(12,\) rotation"):
    jax.eval_shape(tx.update, gradients(params), state, params)


@pytest.mark.parametrize('fn', [
    lx.layer_rotation,                          # (params, init_params)
    lambda params, reference: lx.step_rotation(reference, params),
], ids=['layer_rotation', 'step_rotation'])
def test_rotation_of_mismatched_params_names_the_path(fn, params):
  """``fn(params, reference)``: which leaves are layers is read from params."""
  fn = functools.partial(jax.eval_shape, fn)
  other = jax.tree.map(lambda x: x + 1.0, params)
  del other['Conv_0']
  with pytest.raises(ValueError, match=r"Missing paths: \['Conv_0/bias', "
                     r"'Conv_0/kernel'\]"):
    fn(params, other)
  other = jax.tree.map(lambda x: x + 1.0, params)
  other['Conv_1']['kernel'] = other['Conv_1']['kernel'][..., :4]
  with pytest.raises(ValueError, match=r"'Conv_1/kernel' has shape "
                     r"\(3, 3, 4, 4\), expected \(3, 3, 4, 8\)"):
    fn(params, other)
  other = jax.tree.map(lambda x: x + 1.0, params)
  other['Dense_0']['kernel'] = other['Dense_0']['kernel'].astype(jnp.int32)
  with pytest.raises(TypeError, match="'Dense_0/kernel' has dtype int32"):
    fn(params, other)


def test_rotation_accepts_another_floating_dtype_for_init(params):
  """A bfloat16 copy of the initial params measures like the float32 one."""
  init = gradients(params, seed=3)
  exact = layer_rotation(params, init)
  mixed = layer_rotation(params, as_jax(init, jnp.bfloat16))
  for path in ('Conv_0', 'Conv_1', 'Dense_0'):
    np.testing.assert_allclose(mixed[path]['kernel'], exact[path]['kernel'],
                               rtol=2e-2)


@pytest.mark.parametrize('name', TRANSFORMS)
def test_update_without_params_says_so(name, params):
  state = TX[name].init(params)
  with pytest.raises(ValueError, match=r'needs the current params'):
    TX[name].update(gradients(params), state)


def test_track_rotation_without_params_says_so(params):
  tx = lx.track_rotation()
  with pytest.raises(ValueError, match=r'needs the current params'):
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------
# Layers that cannot rotate, rates, multipliers and unit options.


@pytest.mark.parametrize('name', TRANSFORMS)
def test_a_zero_layer_at_init_is_free_not_an_error(name, params):
  """Zero at init: no direction to rotate, so a free unit (trained by the
  incoming direction), the same eagerly and under jit (tests/test_models.py
  states the rule itself)."""
  params['Conv_1']['kernel'] = jnp.zeros_like(params['Conv_1']['kernel'])
  eager, jitted = TX[name].init(params), jax.jit(TX[name].init)(params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)
  if name != 'keep_norm':
    assert bool(lx.free_units(eager)['Conv_1']['kernel'])
    assert not bool(lx.free_units(eager)['Conv_0']['kernel'])


def test_a_zero_neuron_at_init_is_a_free_unit(params):
  params['Dense_0']['kernel'] = params['Dense_0']['kernel'].at[:, 7].set(0.0)
  free = lx.free_units(lx.layca_sgd(RATE, per_neuron=True).init(params))
  assert np.flatnonzero(free['Dense_0']['kernel']).tolist() == [7]
  # As one unit the layer has a direction and rotates.
  assert not bool(lx.free_units(lx.layca_sgd(RATE).init(params))['Dense_0']['kernel'])


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_a_non_finite_layer_at_init_names_the_path(bad, params):
  params['Conv_0']['kernel'] = params['Conv_0']['kernel'].at[0, 0, 0, 0].set(bad)
  with pytest.raises(ValueError, match="'Conv_0/kernel' has a norm that is not finite"):
    lx.layca_adam(RATE).init(params)


def test_a_zero_non_layer_leaf_is_fine(params):
  params['Conv_0']['bias'] = jnp.zeros_like(params['Conv_0']['bias'])
  for make in TRANSFORMS.values():
    make().init(params)


@pytest.mark.parametrize('name', OPTIMIZERS)
@pytest.mark.parametrize('rate', [-0.1, np.nan, -np.inf, np.inf])
def test_negative_nan_or_infinite_rates_are_value_errors(name, rate):
  with pytest.raises(ValueError, match='learning_rate'):
    OPTIMIZERS[name](rate)
  with pytest.raises(ValueError, match='non_layer_learning_rate'):
    OPTIMIZERS[name](0.1, non_layer_learning_rate=rate)


@pytest.mark.parametrize('name', WITH_LAYCA)
@pytest.mark.parametrize('value', [-1.0, np.nan, np.inf])
def test_bad_multipliers_name_the_path(name, value, params):
  multipliers = jax.tree.map(lambda _: 1.0, params)
  multipliers['Conv_1']['kernel'] = value
  with pytest.raises(ValueError, match="Multiplier for 'Conv_1/kernel'"):
    TRANSFORMS[name](multipliers=multipliers).init(params)


def test_multipliers_of_the_wrong_shape_name_the_path(params):
  multipliers = jax.tree.map(lambda _: 1.0, params)
  multipliers['Dense_0']['kernel'] = jnp.ones(3)
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' has shape \(3,\)"):
    lx.layca(multipliers=multipliers).init(params)


def test_zero_multiplier_freezes_the_layer(params):
  multipliers = jax.tree.map(lambda _: 1.0, params)
  multipliers['Conv_1']['kernel'] = 0.0
  tx = lx.layca_sgd(RATE, multipliers=multipliers)
  updates, _ = jax.jit(tx.update)(gradients(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['Conv_1']['kernel'], params['Conv_1']['kernel'],
                             rtol=1e-6)
  assert not bool(jnp.all(new['Conv_0']['kernel'] == params['Conv_0']['kernel']))


@pytest.mark.parametrize('make', [
    lambda **kw: lx.layer_specs(flax_like_params(), **kw),
    lambda **kw: jax.eval_shape(functools.partial(lx.layer_rotation, **kw),
                                flax_like_params(), flax_like_params(1)),
    lambda **kw: lx.layca(**kw).init(flax_like_params()),
    lambda **kw: lx.keep_norm(**kw).init(flax_like_params()),
    lambda **kw: lx.layca_adam(RATE, **kw).init(flax_like_params()),
    lambda **kw: lx.alpha_multipliers(flax_like_params(), 0.5, **kw),
])
def test_unit_options_that_do_not_fit_name_the_path(make):
  with pytest.raises(ValueError, match=r"stack_axes=5 at 'Dense_0/kernel' is "
                     r"out of range for its shape \(72, 10\)"):
    make(stack_axes={'Dense_0': {'kernel': 5, 'bias': 0},
                     'Conv_0': 0, 'Conv_1': 0, 'BatchNorm_0': 0})
  with pytest.raises(ValueError, match="stack_axes at '[A-Za-z_0-9/]+' must "
                     "be >= 0"):
    make(stack_axes=-1)
  with pytest.raises(ValueError, match=r"'[A-Za-z_0-9]+/bias' of shape \(4,\) "
                     r"cannot be split with stack_axes=0 and per_neuron=True"):
    make(per_neuron=True, mask=lambda p: jax.tree.map(lambda _: True, p))


def test_a_global_stack_axes_beyond_a_scalar_leaf_is_an_error():
  params = {'temperature': jnp.ones(()), 'blocks': {'kernel': jnp.ones((3, 4, 4))}}
  with pytest.raises(ValueError, match="'temperature'.*per leaf"):
    lx.layer_specs(params, stack_axes=1)
  specs = lx.layer_specs(params, stack_axes={'temperature': 0, 'blocks': 1})
  assert specs[0].stack_shape == (3,) and specs[1] is None


# ---------------------------------------------------------------------------
# Integer and boolean leaves are never layers.


def test_integer_and_boolean_leaves_are_never_layers(params):
  params['step'] = jnp.arange(6).reshape(2, 3)
  params['flags'] = jnp.ones((2, 3), bool)
  everything = lambda p: jax.tree.map(lambda _: True, p)
  for mask in (None, everything):
    paths = [s.path for s in lx.layer_specs(params, mask=mask) if s is not None]
    assert 'step' not in paths and 'flags' not in paths
  rotation = jax.eval_shape(
      functools.partial(lx.layer_rotation, mask=everything), params, params)
  assert rotation['step'] is None and rotation['flags'] is None
  for name in ('links', 'layca_adam'):
    state = TX[name].init(params)
    grads = gradients(params)
    updates, state = UPDATE[name](grads, state, params)
    new = optax.apply_updates(params, updates)
    if name not in ('links', 'keep_norm'):  # Frozen: they keep their values.
      assert bool(jnp.all(new['step'] == params['step'])), name
      assert bool(jnp.all(new['flags'] == params['flags'])), name
    assert new['step'].dtype == jnp.int32 and new['flags'].dtype == bool


@pytest.mark.parametrize('name', TRANSFORMS)
def test_state_types_do_not_change_across_steps(name, params):
  """As ``lax.scan`` carries and ``optax.apply_if_finite`` need, integer
  leaves and bfloat16 params included."""
  params['step'] = jnp.zeros((), jnp.int32)
  params['Conv_1'] = as_jax(params['Conv_1'], jnp.bfloat16)
  state = TX[name].init(params)
  grads = gradients(params)
  _, new_state = jax.eval_shape(TX[name].update, grads, state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for path, (a, b) in zip(
      jax.tree_util.tree_flatten_with_path(state)[0],
      zip(jax.tree.leaves(state), jax.tree.leaves(new_state))):
    assert (a.shape, a.dtype) == (b.shape, b.dtype), path[0]


# ---------------------------------------------------------------------------
# Empty pytrees.


@pytest.mark.parametrize('empty', [{}, (), [], {'a': {}, 'b': ()}])
def test_an_empty_pytree_is_a_no_op_everywhere(empty):
  for name, tx in TX.items():
    state = tx.init(empty)
    updates, state = tx.update(empty, state, empty)
    assert updates == empty, name
    updates, _ = UPDATE[name](empty, state, empty)
    assert updates == empty, name
  for name in WITH_LAYCA:
    state = TX[name].init(empty)
    assert lx.skipped_steps(state) == empty
    assert lx.norm_drift(state) == empty
  assert lx.layer_specs(empty) == []
  assert lx.layer_rotation(empty, empty) == empty
  assert lx.step_rotation(empty, empty) == empty
  assert lx.alpha_multipliers(empty, 0.5) == empty
  tracker = lx.track_rotation(history=3)
  state = tracker.init(empty)
  updates, state = tracker.update(empty, state, empty)
  assert updates == empty and lx.tracked_rotation(state) == empty
  steps, rotations = lx.rotation_history(state)
  assert steps.tolist() == [0] and rotations == empty
  assert lx.flatten_rotations(lx.tracked_rotation(state)) == {}


# ---------------------------------------------------------------------------
# Non-finite steps.


def with_bad_gradients(params, bad_paths):
  grads = gradients(params)
  for (layer, leaf), bad in bad_paths.items():
    grads[layer][leaf] = grads[layer][leaf].at[(0,) * grads[layer][leaf].ndim
                                               ].set(bad)
  return grads


@pytest.mark.parametrize('name', WITH_LAYCA)
def test_a_layer_with_a_non_finite_step_keeps_its_weights(name, params):
  update = UPDATE[name]
  state = TX[name].init(params)
  grads = with_bad_gradients(params, {('Conv_0', 'kernel'): np.nan,
                                      ('Conv_1', 'kernel'): -np.inf})
  updates, state = update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for layer in ('Conv_0', 'Conv_1'):  # Bit for bit.
    np.testing.assert_array_equal(new[layer]['kernel'], params[layer]['kernel'])
  moved = step_rotation(params, new)['Dense_0']['kernel']
  np.testing.assert_allclose(moved, math.atan(RATE), rtol=1e-5)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
  skipped = lx.skipped_steps(state)
  assert (int(skipped['Conv_0']['kernel']), int(skipped['Conv_1']['kernel']),
          int(skipped['Dense_0']['kernel'])) == (1, 1, 0)

  # The next finite step moves every layer: nothing was poisoned.
  params = new
  updates, state = update(gradients(params, seed=2), state, params)
  new = optax.apply_updates(params, updates)
  rotation = step_rotation(params, new)
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    np.testing.assert_allclose(rotation[layer]['kernel'], math.atan(RATE),
                               rtol=1e-5, err_msg=layer)
  assert int(lx.skipped_steps(state)['Conv_0']['kernel']) == 1
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree.leaves(state) if x is not None)


@pytest.mark.parametrize('name', SAMPLE)
def test_a_neuron_with_a_non_finite_step_keeps_its_weights(name, params):
  tx = TRANSFORMS[name](per_neuron=True)
  state = tx.init(params)
  grads = gradients(params)
  grads['Dense_0']['kernel'] = grads['Dense_0']['kernel'].at[5, 3].set(np.nan)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['Dense_0']['kernel'][:, 3],
                                params['Dense_0']['kernel'][:, 3])
  rotation = np.asarray(jax.jit(functools.partial(
      lx.step_rotation, per_neuron=True))(params, new)['Dense_0']['kernel'])
  np.testing.assert_allclose(np.delete(rotation, 3), math.atan(RATE), rtol=1e-5)
  np.testing.assert_array_equal(lx.skipped_steps(state)['Dense_0']['kernel'],
                                np.eye(10, dtype=int)[3])


@pytest.mark.parametrize('name', ['layca_sgd', 'layca_adam'])
@pytest.mark.parametrize('non_layer_learning_rate', [None, 0.1])
def test_non_finite_gradients_of_non_layer_leaves_change_nothing(
    name, non_layer_learning_rate, params):
  tx = OPTIMIZERS[name](RATE, non_layer_learning_rate=non_layer_learning_rate)
  state = tx.init(params)
  grads = with_bad_gradients(params, {('Conv_0', 'bias'): np.nan,
                                      ('BatchNorm_0', 'scale'): np.inf})
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new['Conv_0']['bias'], params['Conv_0']['bias'])
    np.testing.assert_array_equal(new['BatchNorm_0']['scale'],
                                  params['BatchNorm_0']['scale'])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    params = new


@pytest.mark.parametrize('name', SAMPLE)
def test_composes_with_apply_if_finite(name, params):
  tx = optax.apply_if_finite(TX[name], max_consecutive_errors=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  bad = with_bad_gradients(params, {('Conv_0', 'kernel'): np.nan})
  updates, state = update(bad, state, params)
  new = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # apply_if_finite skips the whole step
  assert int(state.notfinite_count) == 1
  updates, state = update(gradients(params, seed=2), state, params)
  new = optax.apply_updates(params, updates)
  assert int(state.notfinite_count) == 0
  rotation = step_rotation(params, new)
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    np.testing.assert_allclose(rotation[layer]['kernel'], math.atan(RATE),
                               rtol=1e-5, err_msg=layer)


# ---------------------------------------------------------------------------
# Extreme but finite scales.


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-6),
                                        (jnp.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize('weight_scale, grad_scale', [(1e-18, 1e18),
                                                      (1e18, 1e-18)])
@pytest.mark.parametrize('name', SAMPLE)
def test_extreme_scales_stay_finite_and_keep_the_norm(
    name, dtype, tol, weight_scale, grad_scale, params):
  params = as_jax(jax.tree.map(lambda x: x * weight_scale, params), dtype)
  grads = as_jax(jax.tree.map(lambda x: x * grad_scale, gradients(params)),
                 dtype)
  state = TX[name].init(params)
  for _ in range(2):
    updates, state = UPDATE[name](grads, state, params)
    new = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
               for x in jax.tree.leaves(new))
    rotation = step_rotation(params, new)
    for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
      before, after = params[layer]['kernel'], new[layer]['kernel']
      assert abs(float64_norm(after) / float64_norm(before) - 1) < tol, layer
      np.testing.assert_allclose(rotation[layer]['kernel'], math.atan(RATE),
                                 rtol=1e-5 if dtype == jnp.float32 else 2e-2)
    params = new
  assert all(int(c) == 0 for c in jax.tree.leaves(lx.skipped_steps(state)))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('scale', [1e-18, 1e18, 1e-30, 1e30])
def test_rotation_measures_are_scale_free(dtype, scale, params):
  init = gradients(params, seed=5)
  reference = layer_rotation(as_jax(params, dtype), as_jax(init, dtype))
  scaled = layer_rotation(
      as_jax(jax.tree.map(lambda x: x * scale, params), dtype),
      as_jax(jax.tree.map(lambda x: x / scale, init), dtype))
  for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(reference)):
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(a, b, rtol=1e-5 if dtype == jnp.float32 else 2e-2)
