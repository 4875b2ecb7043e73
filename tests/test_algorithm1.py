"""Layca equals Algorithm 1 written independently in NumPy float64 (tests/reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx
from conftest import flat_paths, flax_like_params, nest
import reference as ref

STEPS = 20
RTOL = 1e-5


def _grads_seq(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=v.shape).astype(np.float32)
           for k, v in flat_paths(params).items()} for _ in range(steps)]


def _run_optax(tx, params, grads_seq, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  p = jax.tree.map(jnp.asarray, params)
  for g in grads_seq:
    updates, state = update(nest(g), state, p)
    p = optax.apply_updates(p, updates)
  return flat_paths(p), state


def _is_kernel(name):
  return name.endswith('kernel')


def _assert_close_to_reference(got, want):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k],
                               rtol=RTOL, atol=RTOL * np.abs(want[k]).max(),
                               err_msg=k)


RATE = 3.0 ** -3

OPTIMIZERS = {
    'sgd': (lambda: lx.layca_sgd(RATE), lambda: ref.sgd_direction()),
    'sgd_momentum': (lambda: lx.layca_sgd(RATE, momentum=0.9),
                     lambda: ref.sgd_direction(0.9)),
    'sgd_nesterov': (lambda: lx.layca_sgd(RATE, momentum=0.9, nesterov=True),
                     lambda: ref.sgd_direction(0.9, nesterov=True)),
    'adam': (lambda: lx.layca_adam(RATE), ref.adam_direction),
    'rmsprop': (lambda: lx.layca_rmsprop(RATE), ref.rmsprop_direction),
    'adagrad': (lambda: lx.layca_adagrad(RATE), ref.adagrad_direction),
}


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_optimizer_equals_algorithm1(name):
  make_tx, make_direction = OPTIMIZERS[name]
  params = flax_like_params()
  grads = _grads_seq(params, STEPS)
  got, _ = _run_optax(make_tx(), params, grads)
  want = ref.layca_run(flat_paths(params), grads, RATE, make_direction(),
                       _is_kernel)
  _assert_close_to_reference(got, want)
  for k in got:  # Non-layer leaves are frozen, as in the paper.
    if not _is_kernel(k):
      np.testing.assert_array_equal(got[k], flat_paths(params)[k])


def test_chain_of_links_equals_algorithm1_sgd():
  params = flax_like_params()
  grads = _grads_seq(params, STEPS)
  tx = optax.chain(lx.layca(), optax.sgd(RATE), lx.keep_norm())
  got, _ = _run_optax(tx, params, grads)
  want = ref.layca_run(flat_paths(params), grads, RATE, ref.sgd_direction(),
                       _is_kernel)
  for k in want:
    if _is_kernel(k):
      _assert_close_to_reference({k: got[k]}, {k: want[k]})


def test_chain_with_adam_direction_equals_algorithm1():
  params = flax_like_params()
  grads = _grads_seq(params, STEPS)
  tx = optax.chain(optax.scale_by_adam(), lx.layca(),
                   optax.scale_by_learning_rate(RATE), lx.keep_norm())
  got, _ = _run_optax(tx, params, grads)
  want = ref.layca_run(flat_paths(params), grads, RATE, ref.adam_direction(),
                       _is_kernel)
  for k in want:
    if _is_kernel(k):
      _assert_close_to_reference({k: got[k]}, {k: want[k]})


def test_schedule_rate_equals_algorithm1_per_step_rates():
  params = flax_like_params()
  grads = _grads_seq(params, 6)
  schedule = optax.piecewise_constant_schedule(0.3, {3: 1 / 3})
  got, _ = _run_optax(lx.layca_sgd(schedule), params, grads)
  want = ref.layca_run(flat_paths(params), grads, schedule, ref.sgd_direction(),
                       _is_kernel)
  _assert_close_to_reference(got, want)


def test_multipliers_scale_each_layer_rate():
  params = flax_like_params()
  grads = _grads_seq(params, 5)
  mult = {'Conv_0': 0.5, 'Conv_1': 2.0, 'Dense_0': 0.0}
  multipliers = {k: {'kernel': v, 'bias': 1.0} for k, v in mult.items()}
  multipliers['BatchNorm_0'] = {'scale': 1.0, 'bias': 1.0}
  got, _ = _run_optax(lx.layca_sgd(0.1, multipliers=multipliers), params, grads)
  want = ref.layca_run(flat_paths(params), grads, 0.1, ref.sgd_direction(),
                       _is_kernel,
                       multipliers={f'{k}/kernel': v for k, v in mult.items()})
  _assert_close_to_reference({k: got[k] for k in want if _is_kernel(k)},
                             {k: want[k] for k in want if _is_kernel(k)})


@pytest.mark.parametrize('stack_axes,per_neuron', [(0, True), (1, False), (1, True)])
def test_units_equal_algorithm1_per_unit(stack_axes, per_neuron):
  rng = np.random.default_rng(3)
  params = {'Block': {'kernel': rng.normal(size=(3, 5, 4)).astype(np.float32),
                      'bias': rng.normal(size=(3, 4)).astype(np.float32)}}
  grads = _grads_seq(params, 8)
  tx = lx.layca_sgd(0.2, momentum=0.5, stack_axes=stack_axes,
                    per_neuron=per_neuron)
  got, _ = _run_optax(tx, params, grads)
  flat = flat_paths(params)
  # The default rule: rank >= 2 per slice, and a bias is never a layer.
  is_layer = lambda k: flat[k].ndim - stack_axes >= 2 and not k.endswith('bias')
  want = ref.layca_run(flat, grads, 0.2, ref.sgd_direction(0.5), is_layer,
                       stack_axes=stack_axes, per_neuron=per_neuron)
  _assert_close_to_reference(got, want)


@pytest.mark.parametrize('name', ['sgd_momentum', 'adam'])
def test_jit_and_no_jit_agree(name):
  make_tx = OPTIMIZERS[name][0]
  params = flax_like_params()
  grads = _grads_seq(params, 4)
  jitted, _ = _run_optax(make_tx(), params, grads, jit=True)
  eager, _ = _run_optax(make_tx(), params, grads, jit=False)
  for k in jitted:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6, atol=1e-7)
