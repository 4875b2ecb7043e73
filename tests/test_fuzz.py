"""Fuzzing every public function over shapes, dtypes, unit options, rates and
multipliers: nothing raises but the documented errors, and finite input never
gives NaN or Inf."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import layca_jax as lx

# float64 arrays are accepted and computed in float32 (jax_enable_x64 off).
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, np.float64]
# Decimal exponents of the values: float16 has a narrow range.
SCALES = {jnp.float16: [-2, 0, 2]}
WIDE_SCALES = [-18, -3, 0, 3, 18]
# The only errors a well-typed call may raise: a unit option that does not
# fit a leaf (both name the leaf path).
DOCUMENTED = re.compile(r"stack_axes=\d+ at '.+' is out of range|"
                        r"'.+' of shape .* cannot be split")

pytestmark = pytest.mark.filterwarnings(
    'ignore:Explicitly requested dtype float64')

FUZZ = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@st.composite
def leaves(draw, shape=None):
  dtype = draw(st.sampled_from(DTYPES))
  if shape is None:
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=ndim,
                                max_size=ndim)))
  exponent = draw(st.sampled_from(SCALES.get(dtype, WIDE_SCALES)))
  seed = draw(st.integers(0, 2 ** 16))
  values = np.random.default_rng(seed).normal(size=shape) * 10.0 ** exponent
  values = np.where(values == 0, 10.0 ** exponent, values)
  return (np.asarray(values, dtype) if dtype is np.float64
          else jnp.asarray(values, dtype))


@st.composite
def param_trees(draw):
  n = draw(st.integers(1, 3))
  return {f'Dense_{i}': draw(leaves()) for i in range(n)}


def like(draw, params):
  """Another tree of the same structure and shapes, each leaf its own
  dtype and scale."""
  return {k: draw(leaves(shape=np.shape(v))) for k, v in params.items()}


@st.composite
def unit_options(draw):
  return dict(per_neuron=draw(st.booleans()),
              stack_axes=draw(st.integers(0, 2)),
              mask=draw(st.sampled_from([None, lambda p: jax.tree.map(
                  lambda _: True, p)])))


RATES = st.sampled_from([0.0, 1e-3, 3.0 ** -3, 1.0, 10.0])
MULTIPLIERS = st.sampled_from([None, 0.0, 0.5, 1.0, 4.0])


def call(fn, *args, **kwargs):
  """``fn(...)``, or None when it raised a documented error."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    if DOCUMENTED.search(str(e)):
      return None
    raise


def as_f32(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(as_f32(x))) for x in jax.tree.leaves(tree))


def layer_paths(params, options):
  return [s.path for s in lx.layer_specs(params, **options) if s is not None]


@FUZZ
@given(params=param_trees(), options=unit_options(),
       alpha=st.floats(-1.0, 1.0))
def test_layer_specs_and_alpha_multipliers(params, options, alpha):
  specs = call(lx.layer_specs, params, **options)
  if specs is None:
    return
  for spec, leaf in zip(specs, jax.tree.leaves(params)):
    if spec is not None:
      assert spec.shape == np.shape(leaf)
      assert len(spec.unit_shape) == spec.stack_axes + spec.per_neuron
  multipliers = lx.alpha_multipliers(params, alpha, **options)
  values = [as_f32(m) for m in jax.tree.leaves(multipliers)]
  assert all(np.all((v > 0) & (v <= 1)) for v in values)


@FUZZ
@given(data=st.data(), options=unit_options())
def test_rotations_are_finite_and_in_range(data, options):
  params = data.draw(param_trees())
  init = like(data.draw, params)
  rotation = call(lx.layer_rotation, params, init, **options)
  angle = call(lx.step_rotation, init, params, **options)
  if rotation is None:
    return
  for r, a in zip(jax.tree.leaves(rotation), jax.tree.leaves(angle)):
    r, a = np.asarray(r), np.asarray(a)
    assert r.dtype == np.float32 and np.all(np.isfinite(r)) and np.all(np.isfinite(a))
    assert np.all((r >= 0) & (r <= 2)) and np.all((a >= 0) & (a <= math.pi + 1e-6))
  np.testing.assert_allclose(  # A layer has not turned away from itself.
      np.concatenate([np.ravel(r) for r in jax.tree.leaves(
          lx.layer_rotation(params, params, **options))] + [np.zeros(0)]),
      0.0, atol=1e-6)


TRANSFORMS = {
    'links': lambda rate, m, **o: optax.chain(
        lx.layca(multipliers=m, **o), optax.sgd(rate), lx.keep_norm(**o)),
    'keep_norm': lambda rate, m, **o: optax.chain(optax.adam(rate),
                                                  lx.keep_norm(**o)),
    'layca_sgd': lambda rate, m, **o: lx.layca_sgd(
        rate, momentum=0.9, nesterov=True, multipliers=m, **o),
    'layca_adam': lambda rate, m, **o: lx.layca_adam(
        rate, multipliers=m, non_layer_learning_rate=rate, **o),
    'layca_rmsprop': lambda rate, m, **o: lx.layca_rmsprop(
        rate, multipliers=m, **o),
    'layca_adagrad': lambda rate, m, **o: lx.layca_adagrad(
        rate, multipliers=m, **o),
}


@pytest.mark.parametrize('name', TRANSFORMS)
@settings(FUZZ, max_examples=5)
@given(data=st.data(), options=unit_options(), rate=RATES, m=MULTIPLIERS)
def test_transforms_stay_finite_and_on_the_sphere(name, data, options, rate, m):
  params = data.draw(param_trees())
  tx = TRANSFORMS[name](rate, m, **options)
  tracker = lx.track_rotation(history=2, **options)
  state = call(tx.init, params)
  if state is None:
    return
  tracking = tracker.init(params)
  paths = layer_paths(params, options)
  start = params
  for _ in range(2):
    grads = like(data.draw, params)
    updates, state = tx.update(grads, state, params)
    assert all_finite(updates), name
    _, tracking = tracker.update(updates, tracking, params)
    new = optax.apply_updates(params, updates)
    assert all_finite(new), name
    for path in paths:
      before, after = as_f32(params[path]), as_f32(new[path])
      n0 = np.linalg.norm(before.astype(np.float64))
      n = np.linalg.norm(after.astype(np.float64))
      tol = 1e-5 if jnp.asarray(params[path]).dtype == jnp.float32 else 1e-2
      assert abs(n / n0 - 1) < tol, (name, path, n, n0)
    params = new
  if name != 'keep_norm':
    assert all(np.all(np.asarray(c) == 0) for c in jax.tree.leaves(
        lx.skipped_steps(state)))
    assert all_finite(lx.norm_drift(state))
  rotations = lx.tracked_rotation(tracking)
  assert all_finite(rotations)
  steps, history = lx.rotation_history(tracking)
  assert steps.tolist() == [0, 1] and all_finite(history)
  flat = lx.flatten_rotations(rotations)
  assert all(math.isfinite(v) for v in flat.values())
  assert {k.split('/')[0] for k in flat} == set(paths)
  assert all_finite(lx.layer_rotation(params, start, **options))
  recorder = lx.RotationHistory()
  recorder.record(0, rotations)
  assert all(np.all(np.isfinite(c)) for c in recorder.curves.values())
  assert isinstance(lx.rotation_table(rotations, params), str)


@FUZZ
@given(params=param_trees())
def test_forward_order_lists_each_layer_once(params):
  layers = layer_paths(params, {})

  def apply_fn(p, x):  # Uses the leaves in reverse order of their names.
    for k in sorted(p, reverse=True):
      x = x + jnp.sum(jnp.asarray(p[k]).astype(jnp.float32))
    return x

  order = lx.forward_order(apply_fn, params, jnp.ones(()))
  assert [p for p in order if p in layers] == sorted(layers, reverse=True)
