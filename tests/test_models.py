"""Layca on the models people train today, out of the box.

The zoo (``tests/models.py``): a linen transformer LM with Flax's default
initialisers (2-D attention biases at zero, LayerNorm, a LoRA adapter with a
zero ``B``, a zero-initialised head), its NNX twin with ``nnx.scan``-ned
blocks, a BatchNorm ResNet and a ReLU MLP. For each, every ready-made
optimizer and the chain of links: eager and jitted ``init`` agree, 24 jitted
steps with the state donated and ``track_rotation`` chained run, the loss
falls, every rotating kernel keeps its norm, biases and normalisation
parameters stay frozen (ready-made optimizers), and every unit that was zero
at init moves off zero (a free unit, reported by ``lx.free_units``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import layca_jax as lx
from layca_jax._layers import path_name
import models

STEPS = 24

TRANSFORMS = {
    'layca_sgd': lambda **o: lx.layca_sgd(0.05, momentum=0.9, **o),
    'layca_adam': lambda **o: lx.layca_adam(0.05, **o),
    'layca_rmsprop': lambda **o: lx.layca_rmsprop(0.05, **o),
    'layca_adagrad': lambda **o: lx.layca_adagrad(0.05, **o),
    'chain': lambda **o: optax.chain(lx.layca(**o), optax.sgd(0.05),
                                     lx.keep_norm(**o)),
}


def flat(tree: Any) -> dict[str, np.ndarray]:
  return {path_name(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_trees(a: Any, b: Any) -> None:
  leaves_a, def_a = jax.tree.flatten(a)
  leaves_b, def_b = jax.tree.flatten(b)
  assert def_a == def_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def check_trained(init: dict, final: dict, layers: dict, losses: list[float],
                  trains_non_layers: bool, free: dict) -> None:
  """The properties every (model, transform) pair must show."""
  assert all(math.isfinite(l) for l in losses)
  assert min(losses[-4:]) < 0.9 * losses[0], losses
  zero_at_init = {k for k in layers if not np.any(init[k])}
  for path, spec in layers.items():
    w0, w = init[path].astype(np.float64), final[path].astype(np.float64)
    if path in zero_at_init:
      assert np.any(w != 0), f'{path}: a zero-initialised unit never moved'
      assert np.all(free[path]), path
      continue
    assert not np.any(free[path]), path
    axes = tuple(range(spec.stack_axes, w.ndim))
    np.testing.assert_allclose(np.sqrt((w ** 2).sum(axes)),
                               np.sqrt((w0 ** 2).sum(axes)), rtol=1e-5,
                               err_msg=f'{path} left its sphere')
  moved = [p for p in layers if p not in zero_at_init
           and not np.array_equal(init[p], final[p])]
  assert len(moved) >= len(layers) // 2, moved
  for path in init.keys() - layers.keys():
    if not trains_non_layers:
      np.testing.assert_array_equal(final[path], init[path], err_msg=path)


class ZooState(train_state.TrainState):
  extra: Any = None


# RMSProp and Adagrad are Adam's fused transform with another base
# direction: the MLP covers them, the bigger models the rest.
@pytest.mark.parametrize('model,transform', [
    (model, transform) for model in ['transformer', 'resnet', 'mlp']
    for transform in sorted(TRANSFORMS)
    if model == 'mlp' or transform not in ('layca_rmsprop', 'layca_adagrad')])
def test_linen_zoo_trains_with_donated_train_state(model, transform):
  case = models.linen_zoo()[model]
  make = TRANSFORMS[transform]
  tx = optax.chain(make(**case.options),
                   lx.track_rotation(every=4, history=8, **case.options))
  # Eager (as TrainState.create calls it) and jitted init agree.
  assert_same_trees(tx.init(case.params), jax.jit(tx.init)(case.params))
  init = flat(case.params)
  layers = {s.path: s for s in lx.layer_specs(case.params, **case.options)
            if s is not None}
  if model == 'transformer':  # Its zero-init head and LoRA B are layers.
    assert {'head/kernel', 'mlp_in_0/lora_b'} <= {
        p for p in layers if not np.any(init[p])}
  state = ZooState.create(apply_fn=None, params=case.params, tx=tx,
                          extra=case.extra)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state):
    (loss, extra), grads = jax.value_and_grad(case.loss, has_aux=True)(
        state.params, state.extra)
    return state.apply_gradients(grads=grads, extra=extra), loss

  losses = []
  for _ in range(STEPS):
    state, loss = step(state)
    losses.append(float(loss))
  check_trained(init, flat(state.params), layers, losses,
                trains_non_layers=transform == 'chain',
                free=flat(lx.free_units(state.opt_state)))
  steps, _ = lx.rotation_history(state.opt_state)
  assert steps.tolist() == list(range(0, STEPS, 4))
  # Rotation from init is measured in-graph; undefined (NaN) for free units.
  for path, value in lx.flatten_rotations(
      lx.tracked_rotation(state.opt_state)).items():
    if np.any(init[path]):
      assert 0.0 <= value <= 2.0, path
    else:
      assert math.isnan(value), path


@pytest.mark.parametrize('transform', sorted(
    set(TRANSFORMS) - {'layca_rmsprop', 'layca_adagrad'}))
def test_nnx_scanned_transformer_trains_with_donated_optimizer(transform):
  model, loss_fn = models.nnx_lm()
  options = {'stack_axes': {'blocks': 1}}   # A plain dict prefix of the State.
  tx = optax.chain(TRANSFORMS[transform](**options),
                   lx.track_rotation(every=4, **options))
  params = nnx.state(model, nnx.Param)
  assert_same_trees(tx.init(params), jax.jit(tx.init)(params))
  init = flat(params)   # Host copies: the model's own arrays change in place.
  layers = {s.path: s for s in lx.layer_specs(params, **options)
            if s is not None}
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(STEPS)]
  check_trained(init, flat(nnx.state(model, nnx.Param)), layers, losses,
                trains_non_layers=transform == 'chain',
                free=flat(lx.free_units(optimizer.opt_state)))
  rotation = lx.flatten_rotations(lx.tracked_rotation(optimizer.opt_state))
  assert 'blocks/mlp_in/kernel/1' in rotation   # NNX keys, no '/value'.
  assert 0.0 < rotation['blocks/mlp_in/kernel/1'] <= 2.0


# ---------------------------------------------------------------------------
# Each point of "Layca on the models people train today", stated on its own.


def _leaf_paths(tree):
  return {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_flax_biases_and_norm_scales_are_not_layers_whatever_their_rank():
  params = models.linen_zoo()['transformer'].params
  layers = {s.path for s in lx.layer_specs(params) if s is not None}
  assert params['attn_0']['query']['bias'].ndim == 2   # DenseGeneral's bias.
  assert params['attn_0']['out']['kernel'].ndim == 3   # DenseGeneral's kernel.
  assert {'attn_0/query/kernel', 'attn_0/out/kernel', 'Embed_0/embedding',
          'mlp_in_0/lora_a', 'head/kernel'} <= layers
  assert not any(p.endswith(('bias', 'scale')) for p in layers)
  # NNX, with the scanned blocks' stack axis forgotten: the stacked biases
  # (2-D and 3-D, all zero) and LayerNorm scales are still not layers, so
  # init neither raises nor treats them as layers.
  model, _ = models.nnx_lm()
  state = nnx.state(model, nnx.Param)
  nnx_layers = {s.path for s in lx.layer_specs(state) if s is not None}
  assert 'blocks/attn/query/kernel' in nnx_layers
  assert not any(p.endswith(('bias', 'scale')) for p in nnx_layers)
  lx.layca_adam(0.01).init(state)
  # mask= still overrides the rule.
  masked = lx.layer_specs(params, mask={'Embed_0': False})
  assert 'Embed_0/embedding' not in {s.path for s in masked if s is not None}


def _head_params():
  rng = np.random.default_rng(0)
  return {'body': {'kernel': jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)},
          'head': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.zeros(3)},
          'gate': {'kernel': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
                   .at[:, 1].set(0.0)}}


@pytest.mark.parametrize('transform', sorted(TRANSFORMS))
def test_zero_initialised_units_are_free_under_eager_and_jitted_init(transform):
  params = _head_params()
  options = {'per_neuron': {'gate': True}}
  tx = TRANSFORMS[transform](**options)
  eager, jitted = tx.init(params), jax.jit(tx.init)(params)
  assert_same_trees(eager, jitted)
  free = lx.free_units(eager)
  assert bool(free['head']['kernel']) and not bool(free['body']['kernel'])
  assert np.asarray(free['gate']['kernel']).tolist() == [False, True, False]
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  p, state = params, jitted
  for _ in range(3):
    updates, state = step(grads, state, p)
    p = optax.apply_updates(p, updates)
  assert np.all(np.asarray(p['head']['kernel']) != 0)   # Moved off zero.
  assert np.all(np.asarray(p['gate']['kernel'])[:, 1] != 0)
  np.testing.assert_allclose(np.linalg.norm(p['body']['kernel']),
                             np.linalg.norm(params['body']['kernel']), rtol=1e-6)
  for count in jax.tree.leaves(lx.skipped_steps(state)):
    assert not np.any(count)


def test_a_free_unit_steps_by_the_rate_times_the_base_direction():
  params = _head_params()
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 2.0), params)
  for tx, expected in [(lx.layca_sgd(0.1), -0.2),
                       (lx.layca_sgd(0.1, multipliers={'head': 0.5}), -0.1),
                       (optax.chain(lx.layca(), optax.sgd(0.1), lx.keep_norm()),
                        -0.2),
                       (lx.layca_adam(0.1), -0.1)]:  # Adam's first step: sign.
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['head']['kernel'], expected, rtol=1e-5)


@pytest.mark.parametrize('transform', sorted(TRANSFORMS))
def test_no_state_leaf_shares_a_buffer_with_the_params_or_another_leaf(transform):
  params = _head_params()
  tx = optax.chain(TRANSFORMS[transform](), lx.track_rotation(history=2))
  state = tx.init(params)   # Eagerly, as flax's TrainState.create does.
  buffers = [x.unsafe_buffer_pointer()
             for x in jax.tree.leaves((params, state)) if x.size]
  assert len(buffers) == len(set(buffers))


INJECTABLE = {
    'sgd': lx.layca_sgd, 'adam': lx.layca_adam, 'rmsprop': lx.layca_rmsprop,
    'adagrad': lx.layca_adagrad,
}


@pytest.mark.parametrize('name', sorted(INJECTABLE) + ['momentum'])
def test_inject_hyperparams_turns_by_the_rate_kept_in_the_state(name):
  factory = INJECTABLE.get(name, lx.layca_sgd)
  kwargs = {'momentum': 0.9} if name == 'momentum' else {}
  tx = optax.inject_hyperparams(factory)(learning_rate=0.1, **kwargs)
  params = {'dense': {'kernel': jnp.asarray(
      np.random.default_rng(1).normal(size=(6, 5)), jnp.float32)}}
  state = tx.init(params)
  step = jax.jit(tx.update)
  rng = np.random.default_rng(2)
  for rate in (0.1, 0.1, 0.5, 0.02):   # Set by hand, as reduce_on_plateau does.
    state.hyperparams['learning_rate'] = jnp.asarray(rate)
    grads = {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 5)),
                                             jnp.float32)}}
    updates, state = step(grads, state, params)
    new = optax.apply_updates(params, updates)
    angle = lx.step_rotation(params, new)['dense']['kernel']
    np.testing.assert_allclose(angle, math.atan(rate), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(new['dense']['kernel']),
                               np.linalg.norm(params['dense']['kernel']),
                               rtol=1e-6)
    params = new


def test_traced_stack_axes_is_a_type_error_naming_static_args():
  tx = optax.inject_hyperparams(lx.layca_sgd)(learning_rate=0.1, stack_axes=1)
  params = {'blocks': {'kernel': jnp.ones((2, 3, 3))}}
  state = tx.init(params)
  with pytest.raises(TypeError, match="static_args=\\('stack_axes',\\)"):
    jax.jit(tx.update)(params, state, params)
  tx = optax.inject_hyperparams(lx.layca_sgd, static_args=('stack_axes',))(
      learning_rate=0.1, stack_axes=1)
  jax.jit(tx.update)(params, tx.init(params), params)


def test_nnx_state_paths_prefixes_and_initial_params():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  params = nnx.state(model, nnx.Param)
  pure = params.to_pure_dict()
  # The same paths and per-leaf options as the equivalent dict.
  assert ([s and s.path for s in lx.layer_specs(params, per_neuron={'layers': {0: True}})]
          == [s and s.path for s in lx.layer_specs(pure, per_neuron={'layers': {0: True}})])
  init = lx.copy_params(params)
  kept = nnx.state(model, nnx.Param)   # The model's live variables.
  model.layers[0].kernel[...] = model.layers[0].kernel[...][::-1]
  rotation = lx.flatten_rotations(
      lx.layer_rotation(nnx.state(model, nnx.Param), init))
  assert list(rotation) == ['layers/0/kernel', 'layers/1/kernel']
  assert rotation['layers/0/kernel'] > 0 and rotation['layers/1/kernel'] == 0
  with pytest.raises(ValueError, match='copy_params'):
    lx.layer_rotation(nnx.state(model, nnx.Param), kept)


@pytest.mark.parametrize('name', sorted(INJECTABLE) + ['chain'])
def test_float64_params_get_float64_precision_and_mixed_dtypes_stay_fixed(name):
  rate = 0.3
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    params = {'a': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
              'b': jnp.asarray(rng.normal(size=(6, 3)), jnp.float64)}
    tx = (optax.chain(lx.layca(), optax.sgd(rate), lx.keep_norm())
          if name == 'chain' else INJECTABLE[name](rate))
    state = tx.init(params)
    grads = {'a': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=(6, 3)), jnp.float64)}
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert ([x.dtype for x in jax.tree.leaves(new_state)]
            == [x.dtype for x in jax.tree.leaves(state)])
    new = optax.apply_updates(params, updates)
    b0, b1 = np.asarray(params['b']), np.asarray(new['b'])
    assert b1.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(b1), np.linalg.norm(b0), rtol=1e-13)
    u0, u1 = b0 / np.linalg.norm(b0), b1 / np.linalg.norm(b1)
    angle = 2 * math.asin(np.linalg.norm(u1 - u0) / 2)   # exact for small angles
    np.testing.assert_allclose(angle, math.atan(rate), rtol=1e-11)


def test_complex_leaves_are_a_type_error_unless_masked_out():
  params = {'kernel': jnp.ones((3, 3)), 'phase': jnp.ones((3, 3), jnp.complex64)}
  with pytest.raises(TypeError, match="'phase'"):
    lx.layca_sgd(0.1).init(params)
  tx = lx.layca_sgd(0.1, mask={'phase': False})
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params),
                         params)
  np.testing.assert_array_equal(updates['phase'], 0)   # A frozen non-layer.


def test_weight_decay_before_layca_is_projected_out():
  """add_decayed_weights adds wd * w, which is along the weights: the
  projection removes it, so it changes nothing (the norm is fixed)."""
  params = _head_params()
  params.pop('head')
  grads = jax.tree.map(lambda x: jnp.cos(x * 7.0), params)
  plain = optax.chain(lx.layca(), optax.sgd(0.1), lx.keep_norm())
  decayed = optax.chain(optax.add_decayed_weights(0.5), lx.layca(),
                        optax.sgd(0.1), lx.keep_norm())
  u1, _ = plain.update(grads, plain.init(params), params)
  u2, _ = decayed.update(grads, decayed.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scaling_after_layca_turns_slower_and_keep_norm_must_come_last():
  params = {'kernel': jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)),
                                  jnp.float32)}
  grads = {'kernel': jnp.asarray(np.random.default_rng(6).normal(size=(6, 4)),
                                 jnp.float32)}
  off = optax.chain(lx.layca(), optax.sgd(0.4), lx.keep_norm(), optax.scale(0.5))
  on = optax.chain(lx.layca(), optax.sgd(0.4), optax.scale(0.5), lx.keep_norm())
  for tx, on_sphere in ((off, False), (on, True)):
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    kept = math.isclose(float(np.linalg.norm(new['kernel'])),
                        float(np.linalg.norm(params['kernel'])), rel_tol=1e-5)
    assert kept == on_sphere
  angle = lx.step_rotation(params, new)['kernel']
  np.testing.assert_allclose(angle, math.atan(0.2), rtol=1e-4)


@pytest.mark.parametrize('make_fused,base', [
    (lambda: lx.layca_rmsprop(0.1, eps_in_sqrt=False, initial_scale=1.0),
     lambda: optax.scale_by_rms(eps_in_sqrt=False, initial_scale=1.0)),
    (lambda: lx.layca_adam(0.1, nesterov=True, eps_root=1e-8),
     lambda: optax.scale_by_adam(nesterov=True, eps_root=1e-8)),
    (lambda: lx.layca_adagrad(0.1, initial_accumulator_value=0.0, eps=1e-7),
     lambda: optax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-7)),
])
def test_base_optimizer_options_reach_the_base_direction(make_fused, base):
  params = {'kernel': jnp.asarray(np.random.default_rng(7).normal(size=(6, 4)),
                                  jnp.float32)}
  chain = optax.chain(base(), lx.layca(), optax.scale_by_learning_rate(0.1),
                      lx.keep_norm())
  fused = make_fused()
  p1 = p2 = params
  s1, s2 = fused.init(params), chain.init(params)
  for seed in range(4):
    grads = {'kernel': jnp.asarray(np.random.default_rng(seed).normal(size=(6, 4)),
                                   jnp.float32)}
    u1, s1 = fused.update(grads, s1, p1)
    u2, s2 = chain.update(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  np.testing.assert_allclose(p1['kernel'], p2['kernel'], rtol=1e-5, atol=1e-6)
