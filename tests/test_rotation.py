"""lx.layer_rotation / lx.step_rotation against SciPy and float64 references."""

import math
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import distance

import layca_jax as lx
from layca_jax import _rotation
from layca_jax._layers import layer_specs

SETTINGS = hypothesis.settings(max_examples=12, deadline=None)
SHAPES = [(3, 4), (2, 3, 5), (6, 2), (2, 2, 2, 3)]


@st.composite
def param_pairs(draw):
  """Two pytrees of mixed layer shapes, each leaf at its own scale."""
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  n = draw(st.integers(1, 3))
  tree, init = {}, {}
  for i in range(n):
    shape = SHAPES[draw(st.integers(0, len(SHAPES) - 1))]
    scale0 = 10.0 ** draw(st.integers(-6, 6))
    scale = 10.0 ** draw(st.integers(-6, 6))
    mix = draw(st.sampled_from([0.0, 1e-2, 0.3, 1.0, 5.0]))
    w0 = rng.normal(size=shape)
    w = (w0 + mix * rng.normal(size=shape)) * scale
    tree[f'Dense_{i}'] = {'kernel': w.astype(np.float32),
                          'bias': rng.normal(size=shape[-1:]).astype(np.float32)}
    init[f'Dense_{i}'] = {'kernel': (w0 * scale0).astype(np.float32),
                          'bias': np.zeros(shape[-1:], np.float32)}
  return tree, init


@SETTINGS
@hypothesis.given(param_pairs(), st.booleans())
def test_layer_rotation_equals_scipy_cosine(pair, jitted):
  params, init = pair
  fn = jax.jit(lx.layer_rotation) if jitted else lx.layer_rotation
  got = fn(params, init)
  for name in params:
    assert got[name]['bias'] is None
    want = distance.cosine(np.ravel(params[name]['kernel']).astype(np.float64),
                           np.ravel(init[name]['kernel']).astype(np.float64))
    assert got[name]['kernel'].dtype == jnp.float32
    np.testing.assert_allclose(got[name]['kernel'], want, atol=1e-5)


@SETTINGS
@hypothesis.given(st.integers(0, 2**31 - 1), st.booleans())
def test_per_neuron_and_stacked_units_equal_scipy_per_slice(seed, jitted):
  rng = np.random.default_rng(seed)
  w0 = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  w = (w0 + rng.normal(size=w0.shape) * rng.choice([0.01, 1.0])
       ).astype(np.float32) * 3.0
  fn = (jax.jit(lx.layer_rotation, static_argnames=('per_neuron', 'stack_axes'))
        if jitted else lx.layer_rotation)
  per_neuron = fn({'k': w}, {'k': w0}, per_neuron=True)['k']
  stacked = fn({'k': w}, {'k': w0}, stack_axes=1)['k']
  both = fn({'k': w}, {'k': w0}, stack_axes=1, per_neuron=True)['k']
  assert per_neuron.shape == (5,) and stacked.shape == (2,)
  assert both.shape == (2, 5)
  for j in range(5):
    np.testing.assert_allclose(
        per_neuron[j], distance.cosine(w[..., j].ravel(), w0[..., j].ravel()),
        atol=1e-5)
  for i in range(2):
    np.testing.assert_allclose(
        stacked[i], distance.cosine(w[i].ravel(), w0[i].ravel()), atol=1e-5)
    for j in range(5):
      np.testing.assert_allclose(
          both[i, j],
          distance.cosine(w[i, ..., j].ravel(), w0[i, ..., j].ravel()),
          atol=1e-5)


def test_structure_mismatch_names_the_path():
  params = {'a': {'kernel': jnp.ones((2, 3))}, 'b': jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="'b'"):
    lx.layer_rotation(params, {'a': {'kernel': jnp.ones((2, 3))}})
  with pytest.raises(ValueError, match=r"a/kernel.*\(3, 2\)"):
    lx.layer_rotation(params, {'a': {'kernel': jnp.ones((3, 2))},
                               'b': jnp.ones((2, 2))})
  with pytest.raises(ValueError, match='before'):
    lx.step_rotation({'a': jnp.ones((2, 2))}, {'b': jnp.ones((2, 2))})


def _angle64(a, b):
  a = np.ravel(a).astype(np.float64)
  b = np.ravel(b).astype(np.float64)
  # arctan2(|a x b|, a.b) through the chord: accurate at every angle.
  chord = np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))
  return 2.0 * np.arcsin(chord / 2.0)


@pytest.mark.parametrize('theta', [1e-4, 1e-2, 0.5, 2.0, 3.1])
@pytest.mark.parametrize('growth', [1.0, 1.3, 1e3])
def test_step_rotation_equals_float64_angle(theta, growth):
  rng = np.random.default_rng(0)
  before = rng.normal(size=(8, 16))
  tangent = rng.normal(size=before.shape)
  tangent -= (tangent * before).sum() / (before * before).sum() * before
  tangent *= np.linalg.norm(before) / np.linalg.norm(tangent)
  after = growth * (math.cos(theta) * before + math.sin(theta) * tangent)
  before, after = before.astype(np.float32), after.astype(np.float32)
  got = jax.jit(lx.step_rotation)({'k': before}, {'k': after})['k']
  want = _angle64(before, after)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def _small_angle_case(theta, growth, scale, n=4096):
  rng = np.random.default_rng(1)
  b = rng.normal(size=(n // 16, 16))
  t = rng.normal(size=b.shape)
  t -= (t * b).sum() / (b * b).sum() * b
  t *= np.linalg.norm(b) / np.linalg.norm(t)
  a = growth * scale * (math.cos(theta) * b + math.sin(theta) * t)
  return a.astype(np.float32), (b * scale).astype(np.float32)


@pytest.mark.parametrize('theta,growth,scale,level', [
    (0.5, 1.0, 1.0, 0),     # one pass
    (1e-3, 1.0, 1.0, 0),    # one pass: small angle, norm kept (Layca)
    (1e-3, 1.5, 1.0, 1),    # small angle with a large norm change
    (0.3, 1.0, 1e25, 2),    # beyond the one-pass range: scaled passes
    (1e-3, 2.0, 1e-30, 2),
])
def test_small_angles_stay_accurate_on_every_path(theta, growth, scale, level):
  a, b = _small_angle_case(theta, growth, scale)
  spec = layer_specs({'k': a})[0]
  assert int(_rotation._one_pass(spec, jnp.asarray(a), jnp.asarray(b),
                                 None).level) == level
  want = 1.0 - math.cos(_angle64(a, b))
  got = jax.jit(lx.layer_rotation)({'k': a}, {'k': b})['k']
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_zero_and_nonfinite_units_are_nan_and_others_unaffected():
  w0 = np.ones((3, 4), np.float32)
  w = w0.copy()
  w[:, 1] = 0.0
  w[0, 2] = np.inf
  w[:, 3] *= 2.0
  got = np.asarray(
      lx.layer_rotation({'k': w}, {'k': w0}, per_neuron=True)['k'])
  assert np.isnan(got[1]) and np.isnan(got[2])
  np.testing.assert_allclose(got[[0, 3]], 0.0, atol=1e-7)
  assert np.isnan(lx.layer_rotation({'k': np.zeros((2, 2))},
                                    {'k': np.ones((2, 2))})['k'])


def test_bfloat16_params_give_float32_rotations():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(16, 8))
  w = w0 + 0.5 * rng.normal(size=w0.shape)
  got = lx.layer_rotation({'k': jnp.asarray(w, jnp.bfloat16)},
                          {'k': jnp.asarray(w0, jnp.bfloat16)})['k']
  assert got.dtype == jnp.float32
  want = distance.cosine(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64).ravel(),
                         np.asarray(jnp.asarray(w0, jnp.bfloat16), np.float64).ravel())
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_identical_params_have_zero_rotation_in_one_pass():
  w = {'k': jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)),
                        jnp.float32)}
  assert float(lx.layer_rotation(w, w)['k']) == 0.0
  assert float(lx.step_rotation(w, w)['k']) == 0.0


_SHARDED_SCRIPT = r'''
import os
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import layca_jax as lx
mesh = jax.make_mesh((2,), ('x',))
sharding = NamedSharding(mesh, P('x'))
rng = np.random.default_rng(0)
w0 = rng.normal(size=(8, 6)).astype(np.float32)
for w in [w0 + rng.normal(size=w0.shape),  # one pass
          1.5 * (w0 + 1e-3 * rng.normal(size=w0.shape)),  # second pass
          1e30 * (w0 + rng.normal(size=w0.shape))]:  # scaled passes
  w = w.astype(np.float32)
  a, b = jax.device_put(w, sharding), jax.device_put(w0, sharding)
  mapped = jax.jit(jax.shard_map(
      lambda a, b: lx.layer_rotation({'k': a}, {'k': b}, axis_name='x')['k'],
      mesh=mesh, in_specs=(P('x'), P('x')), out_specs=P()))(a, b)
  gspmd = jax.jit(lx.layer_rotation)({'k': a}, {'k': b})['k']
  print(float(mapped), float(gspmd), float(lx.layer_rotation({'k': w}, {'k': w0})['k']))
'''


def test_sharded_params_give_the_unsharded_answer():
  import subprocess
  out = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT],
                       capture_output=True, text=True, check=True).stdout
  for line in out.strip().splitlines():
    mapped, gspmd, single = map(float, line.split())
    np.testing.assert_allclose([mapped, gspmd], single, rtol=1e-5)
