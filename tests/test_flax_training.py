"""Layca inside real Flax training loops: linen, nnx (nnx.Optimizer) and nn.scan-stacked layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layca_jax as lx


def _blobs(n=256, dim=16, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * 2.0
  labels = rng.integers(0, classes, n)
  x = centers[labels] + rng.normal(size=(n, dim))
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = x[..., None]
    x = nn.Conv(8, (3,))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(8, (3,))(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(4)(x)


def _kernel_norms(params):
  return {k: float(jnp.linalg.norm(v['kernel'])) for k, v in params.items() if 'kernel' in v}


def test_linen_training_loop_with_layca_sgd():
  x, y = _blobs()
  model = LinenCNN()
  variables = model.init(jax.random.PRNGKey(0), x[:2], train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  init_params = params
  tx = lx.layca_sgd(3.0 ** -2, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(p, stats):
    logits, updates = model.apply({'params': p, 'batch_stats': stats}, x,
                                  train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def step(p, stats, s):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), stats, s, loss

  losses = []
  for _ in range(40):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  for name, norm in _kernel_norms(params).items():
    np.testing.assert_allclose(norm, _kernel_norms(init_params)[name], rtol=1e-5)
  np.testing.assert_array_equal(params['BatchNorm_0']['scale'],
                                init_params['BatchNorm_0']['scale'])
  np.testing.assert_array_equal(params['Dense_0']['bias'], init_params['Dense_0']['bias'])
  rotation = lx.layer_rotation(params, init_params)
  assert all(0.05 < float(rotation[k]['kernel']) <= 2 for k in ('Conv_0', 'Conv_1', 'Dense_0'))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(16, 32, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.out = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_nnx_optimizer_training_loop_with_layca_sgd():
  x, y = _blobs()
  model = NnxMLP(nnx.Rngs(0))
  init_kernels = {'hidden': np.asarray(model.hidden.kernel[...]),
                  'out': np.asarray(model.out.kernel[...])}
  init_bias = np.asarray(model.out.bias[...])
  optimizer = nnx.Optimizer(model, lx.layca_sgd(3.0 ** -2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.5 * losses[0]
  for name, w0 in init_kernels.items():
    w = np.asarray(getattr(model, name).kernel[...])
    np.testing.assert_allclose(np.linalg.norm(w), np.linalg.norm(w0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.out.bias[...]), init_bias)
  rotation = lx.layer_rotation(
      {'hidden': model.hidden.kernel[...]}, {'hidden': init_kernels['hidden']})
  assert float(rotation['hidden']) > 0.05


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.tanh(nn.Dense(x.shape[-1])(x)), None


class ScannedMLP(nn.Module):
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x)
    blocks = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                     length=self.depth)
    x, _ = blocks(name='blocks')(x, None)
    return nn.Dense(4, name='head')(x)


def test_nn_scan_model_trains_with_per_slice_layca():
  x, y = _blobs()
  model = ScannedMLP()
  params = model.init(jax.random.PRNGKey(1), x[:2])['params']
  stack_axes = jax.tree.map(lambda _: 0, params)
  stack_axes['blocks'] = jax.tree.map(lambda _: 1, params['blocks'])
  assert params['blocks']['Dense_0']['kernel'].shape == (3, 16, 16)
  rate = 0.1
  tx = lx.layca_sgd(rate, stack_axes=stack_axes)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  first = None
  for i in range(30):
    new, state, loss = step(params, state)
    first = float(loss) if first is None else first
    if i == 0:  # Each stacked slice is its own layer: norm kept, turned by atan(rate).
      before = np.asarray(params['blocks']['Dense_0']['kernel'], np.float64)
      after = np.asarray(new['blocks']['Dense_0']['kernel'], np.float64)
      for b, a in zip(before, after):
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=1e-5)
        cos = (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
        np.testing.assert_allclose(np.arccos(np.clip(cos, -1, 1)), np.arctan(rate), rtol=1e-3)
      angles = lx.step_rotation(params, new, stack_axes=stack_axes)
      assert angles['blocks']['Dense_0']['kernel'].shape == (3,)
      np.testing.assert_allclose(angles['blocks']['Dense_0']['kernel'], np.arctan(rate), rtol=1e-4)
      assert angles['blocks']['Dense_0']['bias'] is None
    params = new
  assert float(loss) < 0.5 * first
