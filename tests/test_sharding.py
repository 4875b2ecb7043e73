"""Layca at scale: sharded params, shard_map/pmap, scanned layers, state size.

The 8-device checks live in ``tests/sharding_checks.py`` and run in one
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), so this
process keeps its single device; one test reports every check that failed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx
from layca_jax._layers import UnitOptions

HERE = Path(__file__).resolve().parent

# Every check of sharding_checks.py (kept in sync by test_every_check_ran).
SHARDING_CHECKS = (
    'dp', 'fsdp', 'tp', 'fsdp_tp_2d', 'fsdp_explicit_axes', 'uneven',
    'shard_map_one_axis_name', 'shard_map_per_leaf_axis_name',
    'shard_map_tensor_parallel', 'shard_map_double_counting',
    'init_outside_mapping', 'pmap', 'traced_as_on_tpu', 'traced_as_on_gpu')


# ---------------------------------------------------------------------------
# nn.scan: stacked layers give the unrolled model's result.


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(8)(x)), None


class Scanned(nn.Module):
  """Optional input/output layers around 3 scanned blocks."""
  with_ends: bool

  @nn.compact
  def __call__(self, x):
    if self.with_ends:
      x = nn.Dense(8, name='Dense_in')(x)
    blocks = nn.scan(Block, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=3)
    x, _ = blocks(name='Blocks')(x, None)
    return nn.Dense(2, name='Dense_out')(x) if self.with_ends else x


class Unrolled(nn.Module):
  with_ends: bool

  @nn.compact
  def __call__(self, x):
    if self.with_ends:
      x = nn.Dense(8, name='Dense_in')(x)
    for i in range(3):
      x = jnp.tanh(nn.Dense(8, name=f'Block_{i}')(x))
    return nn.Dense(2, name='Dense_out')(x) if self.with_ends else x


def unroll(scanned_params: dict) -> dict:
  """The scanned params with each slice of the stack as its own layer."""
  out = {k: v for k, v in scanned_params.items() if k != 'Blocks'}
  stacked = scanned_params['Blocks']['Dense_0']
  for i in range(3):
    out[f'Block_{i}'] = jax.tree.map(lambda x: x[i], stacked)
  return out


def train(model, tx, params, steps=3):
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jax.random.normal(jax.random.key(2), (16, 2 if model.with_ends else 8))
  loss = lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)

  @jax.jit
  def run(params):
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  return run(params)


@pytest.mark.parametrize('with_ends, make', [
    # Everything scanned: stack_axes=1 for all leaves.
    (False, lambda stack: lx.layca_sgd(0.1, momentum=0.9, stack_axes=stack)),
    # Unstacked input/output layers around the stack: a prefix pytree.
    (True, lambda stack: lx.layca_adam(0.05, per_neuron=True, stack_axes=stack,
                                       non_layer_learning_rate=0.01)),
], ids=['all_scanned-layca_sgd_momentum', 'mixed-layca_adam_per_neuron'])
def test_scanned_layers_match_unrolled(with_ends, make):
  """Each slice of an ``nn.scan`` stack is its own layer: trained with
  ``stack_axes=1`` on the stack, it follows the unrolled model's layer."""
  x = jnp.ones((1, 8))
  scanned = Scanned(with_ends)
  params = scanned.init(jax.random.key(0), x)['params']
  stack = 1 if not with_ends else {'Dense_in': 0, 'Blocks': 1, 'Dense_out': 0}
  got, _ = train(scanned, make(stack), params)
  expected, _ = train(Unrolled(with_ends), make(0), unroll(params))
  assert jax.tree.structure(unroll(got)) == jax.tree.structure(expected)
  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(unroll(got))[0],
      jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # Per-slice rotations equal the unrolled layers' rotations.
  rotation = lx.layer_rotation(got, params, stack_axes=stack)
  expected_rotation = lx.layer_rotation(expected, unroll(params))
  for i in range(3):
    np.testing.assert_allclose(
        rotation['Blocks']['Dense_0']['kernel'][i],
        expected_rotation[f'Block_{i}']['kernel'], rtol=1e-5, atol=1e-7)
  assert np.all(rotation['Blocks']['Dense_0']['kernel'] > 0)


# ---------------------------------------------------------------------------
# State size: O(number of units) beyond the base optimizer.


def params_of_size(width: int) -> dict:
  """Same layers and units whatever the width; only the sizes grow."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return {
      'Conv_0': {'kernel': shape(3, 3, 4, width), 'bias': shape(width)},
      'Dense_0': {'kernel': shape(width, width)},
      'Blocks': {'kernel': shape(3, width, width)},
      'LayerNorm_0': {'scale': shape(width)},
  }


def state_size(tx: optax.GradientTransformation, params) -> int:
  return sum(math.prod(x.shape) for x in
             jax.tree.leaves(jax.eval_shape(tx.init, params)))


def num_units(params, **options) -> int:
  return sum(math.prod(s.unit_shape) for s in UnitOptions(**options).specs(params)
             if s is not None)


OPTIONS = [{}, {'per_neuron': True},
           {'stack_axes': {'Conv_0': 0, 'Dense_0': 0, 'Blocks': 1,
                           'LayerNorm_0': 0}}]
PAIRS = {  # (Layca transform, what the same chain keeps without Layca)
    'layca': (lambda **o: lx.layca(**o), lambda: optax.identity()),
    'keep_norm': (lambda **o: lx.keep_norm(**o), lambda: optax.identity()),
    'layca_sgd': (lambda **o: lx.layca_sgd(0.1, **o), lambda: optax.sgd(0.1)),
    'layca_sgd_momentum': (lambda **o: lx.layca_sgd(0.1, momentum=0.9, **o),
                           lambda: optax.sgd(0.1, momentum=0.9)),
    'layca_adam': (lambda **o: lx.layca_adam(0.1, **o),
                   lambda: optax.adam(0.1)),
    'layca_rmsprop': (lambda **o: lx.layca_rmsprop(0.1, **o),
                      lambda: optax.rmsprop(0.1)),
    'layca_adagrad': (lambda **o: lx.layca_adagrad(0.1, **o),
                      lambda: optax.adagrad(0.1)),
}


@pytest.mark.parametrize('options', OPTIONS, ids=['layer', 'neuron', 'stack'])
@pytest.mark.parametrize('name', PAIRS)
def test_state_is_base_plus_o_units(name, options):
  """Beyond the base optimizer, the state holds a few numbers per unit and a
  step count: the same amount whatever the size of the layers."""
  layca, base = PAIRS[name]
  extras = []
  for width in (8, 64):
    params = params_of_size(width)
    units = num_units(params, **options)
    extra = state_size(layca(**options), params) - state_size(base(), params)
    assert 0 <= extra <= 4 * units + 2, (width, extra, units)
    extras.append((extra, units))
  if 'per_neuron' not in options:  # Units do not grow with the width.
    assert extras[0] == extras[1], extras


@pytest.mark.skipif(not hasattr(lx, 'track_rotation'),
                    reason='lx.track_rotation has not landed yet')
def test_track_rotation_holds_one_copy_of_params():
  for width in (8, 64):
    params = params_of_size(width)
    size = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    extra = state_size(lx.track_rotation(), params)
    assert size <= extra <= size + 2 * num_units(params) + 4, (extra, size)


# ---------------------------------------------------------------------------
# 8 devices, in one subprocess.


@pytest.fixture(scope='module')
def sharding_results(tmp_path_factory) -> dict:
  """Runs the 8-device checks in a subprocess (killed if it outlives its
  time) and returns their JSON report. Only one test uses it, so under
  pytest-xdist the subprocess runs once, on one worker."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out_dir = tmp_path_factory.mktemp('sharding_checks')
  out, err = out_dir / 'stdout.txt', out_dir / 'stderr.txt'
  with out.open('w') as stdout, err.open('w') as stderr:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / 'sharding_checks.py')], env=env,
        stdout=stdout, stderr=stderr, cwd=str(HERE.parent))
  try:
    proc.wait(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  stdout, stderr = out.read_text(), err.read_text()
  lines = [l for l in stdout.splitlines() if l.startswith('{')]
  assert proc.returncode == 0 and lines, (
      f'sharding_checks.py exited with {proc.returncode}:\n'
      f'{stdout[-3000:]}\n{stderr[-5000:]}')
  return json.loads(lines[-1])


def test_sharded_matches_single_device(sharding_results):
  """jit+NamedSharding (dp, fsdp, tp, 2-d mesh, Explicit axes, uneven),
  shard_map and pmap with axis_name: every check ran and matched the
  single-device answer to 1e-5."""
  results = sharding_results['results']
  assert sorted(results) == sorted(SHARDING_CHECKS)
  assert sharding_results['tracking'] == hasattr(lx, 'track_rotation')
  failed = {check: outcome for check, outcome in results.items()
            if outcome != 'ok'}
  assert not failed, failed
