"""lx.forward_order and lx.flatten_rotations: depth order, not key order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import layca_jax as lx


class _CNN(nn.Module):
  """Names sort opposite to depth: 'z_conv' runs first, 'a_dense' last."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3,), name='z_conv')(x))
    x = nn.relu(nn.Conv(4, (3,), name='y_conv')(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3, name='a_dense')(x)


class _Reversed(nn.Module):
  """Dense_10 is used before Dense_2."""

  @nn.compact
  def __call__(self, x):
    layers = {i: nn.Dense(4, name=f'Dense_{i}') for i in (2, 10)}
    return layers[2](nn.tanh(layers[10](x)))


def _apply(model):
  return lambda p, x: model.apply({'params': p}, x)


def test_flax_cnn_conv_layers_come_before_the_dense_head():
  model, x = _CNN(), jnp.ones((2, 8, 1))
  params = model.init(jax.random.key(0), x)['params']
  assert lx.forward_order(_apply(model), params, x) == [
      'z_conv/kernel', 'y_conv/kernel', 'a_dense/kernel']


def test_dense_10_used_before_dense_2():
  model, x = _Reversed(), jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)['params']
  assert lx.forward_order(_apply(model), params, x) == [
      'Dense_10/kernel', 'Dense_2/kernel']
  # The natural order (flatten_rotations' default) would say otherwise.
  assert list(lx.flatten_rotations(
      {'Dense_10': {'kernel': 0.1}, 'Dense_2': {'kernel': 0.2}})) == [
          'Dense_2/kernel', 'Dense_10/kernel']


def test_uses_inside_nested_jaxprs_are_found():
  params = {'a': jnp.ones((3, 3)), 'b': jnp.ones((3, 3)), 'c': jnp.ones((3, 3)),
            'd': jnp.ones((3, 3)), 'e': jnp.ones((3, 3)), 'unused': jnp.ones((3, 3))}

  @jax.custom_jvp
  def through_custom(x, w):
    return x @ w

  through_custom.defjvp(lambda primals, tangents: (
      through_custom(*primals), tangents[0] @ primals[1]))

  def apply_fn(p, x):
    # 'e' is passed first into a jit but only used after 'd'.
    x = jax.jit(lambda x, e, d: jnp.tanh(x @ d) @ e)(x, p['e'], p['d'])
    x = through_custom(x, p['c'])

    def body(h, _):
      return jnp.tanh(h @ p['b']), None

    x = jax.lax.scan(body, x, length=2)[0]
    x = jax.lax.cond(x.sum() > 0, lambda h: h @ p['a'], lambda h: h, x)
    return jax.lax.while_loop(lambda h: h.sum() > 1e9, lambda h: h, x)

  assert lx.forward_order(apply_fn, params, jnp.ones((1, 3))) == [
      'd', 'e', 'c', 'b', 'a', 'unused']


def test_options_and_kwargs_pass_through():
  params = {'w': jnp.ones((2, 3, 3)), 'v': jnp.ones((3, 3))}
  apply_fn = lambda p, x, scale=1.0: scale * (x @ p['v']) @ p['w'][0]
  assert lx.forward_order(apply_fn, params, jnp.ones((1, 3)), scale=2.0,
                          stack_axes={'w': 1, 'v': 0}) == ['v', 'w']
  assert lx.forward_order(apply_fn, params, jnp.ones((1, 3)),
                          mask={'w': False, 'v': True}) == ['v']


def test_flatten_rotations_order_prefix_and_units():
  rotations = {'Dense_10': {'kernel': jnp.asarray(0.5), 'bias': None},
               'Dense_2': {'kernel': jnp.asarray([0.25, 0.75])},
               'Stack': {'kernel': jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}}
  flat = lx.flatten_rotations(rotations, prefix='train/rotation/')
  assert flat == {'train/rotation/Dense_2/kernel/0': 0.25,
                  'train/rotation/Dense_2/kernel/1': 0.75,
                  'train/rotation/Dense_10/kernel': 0.5,
                  'train/rotation/Stack/kernel/0/0': 1.0,
                  'train/rotation/Stack/kernel/0/1': 2.0,
                  'train/rotation/Stack/kernel/1/0': 3.0,
                  'train/rotation/Stack/kernel/1/1': 4.0}
  assert all(type(v) is float for v in flat.values())
  order = ['Stack/kernel', 'Dense_10/kernel', 'extra/path', 'Dense_2/kernel']
  assert list(lx.flatten_rotations(rotations, order)) == [
      'Stack/kernel/0/0', 'Stack/kernel/0/1', 'Stack/kernel/1/0',
      'Stack/kernel/1/1', 'Dense_10/kernel', 'Dense_2/kernel/0',
      'Dense_2/kernel/1']
  with pytest.raises(ValueError, match='Dense_2/kernel'):
    lx.flatten_rotations(rotations, ['Stack/kernel', 'Dense_10/kernel'])


def test_forward_order_feeds_alpha_multipliers():
  model, x = _CNN(), jnp.ones((2, 8, 1))
  params = model.init(jax.random.key(0), x)['params']
  order = lx.forward_order(_apply(model), params, x)
  m = lx.alpha_multipliers(params, 0.5, order)
  assert float(m['z_conv']['kernel']) < float(m['y_conv']['kernel']) < float(
      m['a_dense']['kernel']) == 1.0
