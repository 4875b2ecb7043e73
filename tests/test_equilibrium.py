"""Rotational-equilibrium rates, and Layca on Lion and Muon directions.

* ``lx.equilibrium_angle`` / ``lx.equilibrium_rate`` against references
  written here in float64: the published formulas typed as printed, and a
  random-walk simulation of a scale-invariant weight under each optimizer
  (numpy, float64, written from the optimizers' definitions, not optax's
  code): once the norm has settled, the simulated per-step angle is the
  predicted one.
* Schedules in, schedules out: the angle follows ``sqrt(lr_t)``.
* Adam with L2 and bad inputs are refused with clear errors.
* ``optax.scale_by_lion`` and ``optax.contrib.scale_by_muon`` as the base
  direction of a Layca chain: every layer keeps its norm and turns by
  ``atan(rate)`` every step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import layca_jax as lx

# ---------------------------------------------------------------------------
# References, float64.


def published_angle(optimizer, lr, wd, b1=0.9, b2=0.99, momentum=0.0):
  """The formulas as printed in Kosson et al. (2024), Wan et al. (2020)."""
  if optimizer == 'adamw':
    return np.sqrt(2 * lr * wd * (1 - b1) / (1 + b1))
  if optimizer == 'sgd':
    return np.sqrt(2 * lr * wd / (1 + momentum))
  return (np.sqrt(np.pi / 2) * np.sqrt(2 * lr * wd)
          * np.sqrt((1 - b1) ** 2 + b1 ** 2 * (1 - b2) / (1 + b2)))


def simulated_angle(optimizer, lr, wd, *, steps, dim=1000, seed=0, **hyper):
  """Mean per-step angle over the last third of a random walk, float64.

  The weight ``w`` is scale-invariant: its gradient is Gaussian noise
  orthogonal to ``w`` with norm proportional to ``1 / |w|``. The optimizers
  follow their definitions: AdamW (bias-corrected, decoupled decay times
  lr), SGD (decay added to the gradient, then heavy-ball momentum), Lion.
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim)
  m, v = np.zeros(dim), np.zeros(dim)
  angles = []
  for t in range(1, steps + 1):
    norm = np.linalg.norm(w)
    direction = w / norm
    z = rng.normal(size=dim)
    g = (z - direction * (direction @ z)) / norm
    if optimizer == 'adamw':
      b1, b2 = hyper['b1'], 0.999
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
      new = w - lr * (step + wd * w)
    elif optimizer == 'sgd':
      m = hyper['momentum'] * m + g + wd * w
      new = w - lr * m
    else:
      b1, b2 = hyper['b1'], hyper['b2']
      step = np.sign(b1 * m + (1 - b1) * g)
      m = b2 * m + (1 - b2) * g
      new = w - lr * (step + wd * w)
    chord = np.linalg.norm(new / np.linalg.norm(new) - direction)
    angles.append(2 * np.arcsin(chord / 2))
    w = new
  return float(np.mean(angles[2 * steps // 3:]))


HYPER = {'adamw': ('b1',), 'sgd': ('momentum',), 'lion': ('b1', 'b2')}


# ---------------------------------------------------------------------------
# Formulas.


@settings(max_examples=60, deadline=None, derandomize=True)
@given(optimizer=st.sampled_from(sorted(HYPER)),
       lr=st.floats(1e-7, 0.5), wd=st.floats(1e-6, 0.5),
       beta=st.floats(0.0, 0.999), b2=st.floats(0.0, 0.9999))
def test_formulas_match_the_published_ones_in_float64(optimizer, lr, wd, beta,
                                                      b2):
  names = HYPER[optimizer]
  hyper = dict(zip(names, (beta, b2)))
  expected = published_angle(optimizer, lr, wd, **hyper)
  angle = lx.equilibrium_angle(optimizer, lr, wd, **hyper)
  assert isinstance(angle, float)
  assert angle == pytest.approx(expected, rel=1e-13)
  rate = lx.equilibrium_rate(optimizer, lr, wd, **hyper)
  assert rate == pytest.approx(np.tan(expected), rel=1e-13)
  assert math.atan(rate) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize('optimizer, hyper', [
    ('adamw', {}), ('sgd', {}), ('lion', {})])
def test_defaults_are_optax_defaults(optimizer, hyper):
  defaults = {'adamw': {'b1': 0.9}, 'sgd': {'momentum': 0.0},
              'lion': {'b1': 0.9, 'b2': 0.99}}[optimizer]
  assert lx.equilibrium_angle(optimizer, 1e-3, 0.1) == pytest.approx(
      published_angle(optimizer, 1e-3, 0.1, **defaults), rel=1e-13)


@pytest.mark.parametrize('optimizer, lr, wd, hyper, steps', [
    ('adamw', 1e-2, 0.5, {'b1': 0.9}, 2000),
    ('adamw', 1e-2, 0.5, {'b1': 0.5}, 2000),
    ('sgd', 0.1, 0.05, {'momentum': 0.9}, 1500),
    ('sgd', 0.1, 0.05, {'momentum': 0.0}, 1500),
    # Lion's formula assumes the momentum's memory, 1 / (1 - b2) steps, is
    # short next to the relaxation time 1 / (2 lr wd): 100 vs 1000 here.
    ('lion', 1e-3, 0.5, {'b1': 0.9, 'b2': 0.99}, 12000),
])
def test_formulas_predict_a_simulated_random_walk(optimizer, lr, wd, hyper,
                                                  steps):
  simulated = simulated_angle(optimizer, lr, wd, steps=steps, **hyper)
  assert lx.equilibrium_angle(optimizer, lr, wd, **hyper) == pytest.approx(
      simulated, rel=0.03)


@pytest.mark.parametrize('lr, wd, hyper, steps, low, high', [
    # sign() linearised: off by about sqrt(1 + (pi/2 - 1) k) at b1 = 0.5.
    (1e-3, 0.5, {'b1': 0.5, 'b2': 0.99}, 12000, 0.91, 0.97),
    # Momentum memory 10 steps, relaxation 100: lr wd / (1 - b2) = 0.05.
    (1e-2, 0.5, {'b1': 0.9, 'b2': 0.9}, 1500, 0.93, 0.98),
])
def test_lion_formula_deviations_stated_in_the_docstring(lr, wd, hyper, steps,
                                                         low, high):
  simulated = simulated_angle('lion', lr, wd, steps=steps, **hyper)
  assert low < simulated / lx.equilibrium_angle('lion', lr, wd, **hyper) < high


# ---------------------------------------------------------------------------
# Schedules.


def test_rate_schedule_follows_sqrt_of_the_learning_rate():
  lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 1000)
  angles = lx.equilibrium_angle('adamw', lr, 0.1)
  rates = lx.equilibrium_rate('adamw', lr, 0.1)
  peak = lx.equilibrium_angle('adamw', 3e-3, 0.1)
  steps = np.array([0, 1, 50, 100, 400, 999, 1000])
  got = np.asarray(jax.vmap(angles)(steps), np.float64)
  expected = peak * np.sqrt(np.asarray(jax.vmap(lr)(steps), np.float64) / 3e-3)
  np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9)
  np.testing.assert_allclose(np.asarray(jax.vmap(rates)(steps)),
                             np.tan(got), rtol=2e-6, atol=1e-9)
  assert float(jax.jit(rates)(jnp.int32(100))) == pytest.approx(
      math.tan(peak), rel=1e-6)


def test_traced_learning_rate_gives_the_float_answer():
  traced = jax.jit(lambda lr: lx.equilibrium_rate('sgd', lr, 5e-4,
                                                  momentum=0.9))(0.1)
  assert float(traced) == pytest.approx(
      lx.equilibrium_rate('sgd', 0.1, 5e-4, momentum=0.9), rel=1e-6)


def test_layca_at_the_rate_schedule_turns_by_the_equilibrium_angle():
  lr = optax.linear_schedule(1e-3, 4e-3, 3)
  angles = lx.equilibrium_angle('adamw', lr, 0.1)
  tx = lx.layca_adam(lx.equilibrium_rate('adamw', lr, 0.1))
  rng = np.random.default_rng(0)
  params = {'kernel': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
  state = tx.init(params)
  step = jitted_step(tx)
  for t in range(3):
    grads = {'kernel': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
    params, state, turned = step(params, state, grads)
    assert float(turned['kernel']) == pytest.approx(float(angles(t)), rel=1e-4)


# ---------------------------------------------------------------------------
# Refusals and bad inputs.


@pytest.mark.parametrize('name', ['adam', 'Adam', 'adam_l2', 'adam+l2'])
def test_adam_with_l2_is_refused_with_the_reason(name):
  for fn in (lx.equilibrium_angle, lx.equilibrium_rate):
    with pytest.raises(ValueError, match='no closed-form rotational equilib'):
      fn(name, 1e-3, 0.1)


@pytest.mark.parametrize('args, kwargs, error, match', [
    (('rmsprop', 1e-3, 0.1), {}, ValueError, "known: \\['adamw', 'lion', 'sgd'\\]"),
    ((optax.adamw, 1e-3, 0.1), {}, TypeError, 'optimizer must be a name'),
    (('adamw', 1e-3, 0.1), {'momentum': 0.9}, TypeError, "not \\['momentum'\\]"),
    (('sgd', 0.1, 5e-4), {'b1': 0.9}, TypeError, "takes \\['momentum'\\]"),
    (('adamw', 1e-3, 0.1), {'b2': 0.99}, TypeError, "not \\['b2'\\]"),
    (('adamw', 1e-3, 0.1), {'b1': 1.0}, ValueError, r'b1 must be in \[0, 1\)'),
    (('lion', 1e-3, 0.1), {'b2': -0.1}, ValueError, r'b2 must be in \[0, 1\)'),
    (('sgd', 0.1, 5e-4), {'momentum': 1.5}, ValueError, 'momentum must be'),
    (('adamw', -1e-3, 0.1), {}, ValueError, 'learning_rate must be'),
    (('adamw', float('nan'), 0.1), {}, ValueError, 'learning_rate must be'),
    (('adamw', 1e-3, 0.0), {}, ValueError, 'no rotational equilibrium'),
    (('adamw', 1e-3, -0.1), {}, ValueError, 'weight_decay must be a positive'),
    (('adamw', 1e-3, float('inf')), {}, ValueError, 'weight_decay must be'),
    (('adamw', '1e-3', 0.1), {}, TypeError, 'learning_rate must be a real'),
    (('adamw', 1e-3, True), {}, TypeError, 'weight_decay must be a number'),
    (('adamw', 1e-3, 0.1), {'b1': None}, None, None),
    (('sgd', 10.0, 10.0), {}, ValueError, 'not below pi/2'),
])
def test_bad_inputs_are_refused(args, kwargs, error, match):
  if error is None:  # None means "the default".
    assert lx.equilibrium_rate(*args, **kwargs) == lx.equilibrium_rate(*args)
    return
  for fn in (lx.equilibrium_angle, lx.equilibrium_rate):
    with pytest.raises(error, match=match):
      fn(*args, **kwargs)


# ---------------------------------------------------------------------------
# Layca on Lion and Muon directions.


def jitted_step(tx, **options):
  """One jitted step: new params, new state, and each layer's angle."""
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    return new, state, lx.step_rotation(params, new, **options)
  return step


def _params(rng):
  return {'Dense_0': {'kernel': rng.normal(size=(12, 16)),
                      'bias': rng.normal(size=(16,))},
          'Dense_1': {'kernel': rng.normal(size=(16, 8)) * 0.1},
          'Dense_2': {'kernel': rng.normal(size=(8, 4)) * 5.0}}


def _chain(base, rate, **options):
  return optax.chain(base, lx.layca(**options),
                     optax.scale_by_learning_rate(rate), lx.keep_norm(**options))


def muon_direction():
  """Muon on matrices, Adam on the other leaves (Muon needs matrices)."""
  dims = lambda updates: jax.tree.map(
      lambda _: optax.contrib.MuonDimensionNumbers(), updates)
  return optax.partition(
      {'muon': optax.contrib.scale_by_muon(weight_dimension_numbers=dims),
       'adam': optax.scale_by_adam()},
      lambda params: jax.tree.map(
          lambda x: 'muon' if x.ndim == 2 else 'adam', params))


BASES = {
    'lion': lambda: optax.scale_by_lion(b1=0.9, b2=0.99),
    'muon': muon_direction,
}


@pytest.mark.parametrize('base, per_neuron', [
    ('lion', False), ('lion', True), ('muon', False)])
def test_lion_and_muon_chains_keep_norms_and_turn_by_atan_rate(base,
                                                               per_neuron):
  """Every step, every layer (unit) keeps its norm and turns by
  ``atan(rate_t)``; the bias (not a layer) follows the base direction at
  ``rate_t``, as in the chain without Layca."""
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _params(rng))
  rates = optax.linear_schedule(0.3, 0.03, 3)   # a schedule: 0.3 ... 0.03
  tx = _chain(BASES[base](), rates, per_neuron=per_neuron)
  plain = optax.chain(BASES[base](), optax.scale_by_learning_rate(rates))
  state, plain_state = tx.init(params), plain.init(params)
  step = jitted_step(tx, per_neuron=per_neuron)
  plain_update = jax.jit(plain.update)
  unit_norm = lambda w: np.linalg.norm(
      np.asarray(w, np.float64),
      axis=tuple(range(w.ndim - 1)) if per_neuron else None)
  layers = [path for path in params]
  initial_norms = {path: unit_norm(params[path]['kernel']) for path in layers}
  for t in range(4):
    grads = jax.tree.map(
        lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
    expected, plain_state = plain_update(grads, plain_state, params)
    new, state, turned = step(params, state, grads)
    np.testing.assert_allclose(
        new['Dense_0']['bias'] - params['Dense_0']['bias'],
        expected['Dense_0']['bias'], rtol=1e-5, atol=1e-7)
    assert turned['Dense_0']['bias'] is None
    for path in layers:
      np.testing.assert_allclose(unit_norm(new[path]['kernel']),
                                 initial_norms[path], rtol=2e-6,
                                 err_msg=f'{path} step {t}')
      np.testing.assert_allclose(turned[path]['kernel'],
                                 np.arctan(float(rates(t))), rtol=1e-4,
                                 err_msg=f'{path} step {t}')
    params = new


def test_muon_chain_on_a_conv_kernel_with_dimension_numbers():
  rng = np.random.default_rng(3)
  params = {'Conv_0': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 8)),
                                             jnp.float32)},
            'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(8, 10)),
                                              jnp.float32)}}
  dims = {'Conv_0': {'kernel': optax.contrib.MuonDimensionNumbers(
              reduction_axis=(0, 1, 2), output_axis=3)},
          'Dense_0': {'kernel': optax.contrib.MuonDimensionNumbers()}}
  tx = _chain(optax.contrib.scale_by_muon(weight_dimension_numbers=dims),
              0.2)
  grads = jax.tree.map(
      lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
  new, _, turned = jitted_step(tx)(params, tx.init(params), grads)
  for path in params:
    assert float(turned[path]['kernel']) == pytest.approx(math.atan(0.2),
                                                          rel=1e-4), path
    assert float(jnp.linalg.norm(new[path]['kernel'])) == pytest.approx(
        float(jnp.linalg.norm(params[path]['kernel'])), rel=2e-6)
