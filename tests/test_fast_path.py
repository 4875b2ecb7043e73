"""The fused Layca optimizers equal the chain of links, and keep its guarantees.

``lx.layca_*`` compute Algorithm 1 in closed form (one reduction pass, one
elementwise pass) with a careful fallback; these tests state that the result
is the chain ``base, layca(), scale_by_learning_rate(rate), keep_norm()``.
"""

import collections
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layca_jax as lx
from layca_jax import _closed_form as cf
from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec

import reference

BASES = {
    'sgd': (lambda r, **kw: lx.layca_sgd(r, **kw), optax.identity),
    'momentum': (lambda r, **kw: lx.layca_sgd(r, momentum=0.9, **kw),
                 lambda: optax.trace(0.9)),
    'nesterov': (lambda r, **kw: lx.layca_sgd(r, 0.9, True, **kw),
                 lambda: optax.trace(0.9, nesterov=True)),
    'adam': (lambda r, **kw: lx.layca_adam(r, **kw), optax.scale_by_adam),
    'rmsprop': (lambda r, **kw: lx.layca_rmsprop(r, **kw), optax.scale_by_rms),
    'adagrad': (lambda r, **kw: lx.layca_adagrad(r, **kw), optax.scale_by_rss),
}


def chain_of_links(base, rate, **options):
  links = {k: v for k, v in options.items() if k != 'multipliers'}
  return optax.chain(base, lx.layca(**options), optax.scale_by_learning_rate(rate),
                     lx.keep_norm(**links))


def run_both(fused, chain, params, grads_seq):
  """Params after applying each gradient with both transformations (jitted)."""

  @jax.jit
  def step(p1, s1, p2, s2, g):
    u1, s1 = fused.update(g, s1, p1)
    u2, s2 = chain.update(g, s2, p2)
    return optax.apply_updates(p1, u1), s1, optax.apply_updates(p2, u2), s2

  p1 = p2 = params
  s1, s2 = fused.init(params), chain.init(params)
  for g in grads_seq:
    p1, s1, p2, s2 = step(p1, s1, p2, s2, g)
  return p1, s1, p2, s2


def relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def random_tree(rng, shapes, scale=1.0, dtype=np.float32):
  return {name: jnp.asarray(rng.normal(size=shape) * scale, dtype)
          for name, shape in shapes.items()}


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    base=st.sampled_from(sorted(BASES)),
    rate=st.floats(1e-3, 1.0),
    stack=st.integers(0, 1),
    per_neuron=st.booleans(),
    use_multipliers=st.booleans(),
    dims=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    seed=st.integers(0, 2 ** 16),
)
def test_fused_equals_chain_of_links_over_many_steps(
    base, rate, stack, per_neuron, use_multipliers, dims, seed):
  rng = np.random.default_rng(seed)
  shapes = {'kernel': (2,) * stack + tuple(dims) + (3,), 'bias': (3,),
            'dense': (4, 6)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(8)]
  options = dict(per_neuron=per_neuron, stack_axes={'kernel': stack, 'bias': 0,
                                                    'dense': 0})
  if use_multipliers:
    options['multipliers'] = {
        'kernel': jnp.asarray(rng.uniform(0, 2, size=(2,) * stack), jnp.float32),
        'bias': None, 'dense': 0.5}
  make_fused, make_base = BASES[base]
  fused = make_fused(rate, non_layer_learning_rate=rate, **options)
  chain = chain_of_links(make_base(), rate, **options)
  p1, s1, p2, s2 = run_both(fused, chain, params, grads_seq)
  for name in shapes:
    assert relative_error(p1[name], p2[name]) < 1e-5, name
  for name in ('kernel', 'dense'):
    np.testing.assert_allclose(lx.norm_drift(s1)[name], 0.0, atol=1e-5)
    np.testing.assert_array_equal(lx.skipped_steps(s1)[name], 0)


@pytest.mark.parametrize('base', ['sgd', 'adam'])
def test_bf16_params_agree_with_the_chain_to_bf16_rounding(base):
  rng = np.random.default_rng(0)
  shapes = {'kernel': (16, 8), 'conv': (3, 3, 4, 8)}
  params = random_tree(rng, shapes, dtype=jnp.bfloat16)
  grads_seq = [random_tree(rng, shapes, dtype=jnp.bfloat16) for _ in range(3)]
  make_fused, make_base = BASES[base]
  p1, s1, p2, _ = run_both(make_fused(0.1), chain_of_links(make_base(), 0.1),
                           params, grads_seq)
  for name in shapes:
    assert p1[name].dtype == jnp.bfloat16
    # Both round every step to bf16 (8 bits); the chain also rounds its
    # intermediate step, so they differ by a few bf16 ulps at most.
    assert relative_error(p1[name], p2[name]) < 2 ** -6, name
    np.testing.assert_allclose(lx.norm_drift(s1)[name], 0.0, atol=2 ** -7)


@pytest.mark.parametrize('w_scale,g_scale', [(1e-18, 1e18), (1e18, 1e-18),
                                             (1e-30, 1e-30), (1e30, 1e30)])
@pytest.mark.parametrize('per_neuron', [False, True])
def test_extreme_finite_scales_follow_algorithm1(w_scale, g_scale, per_neuron):
  rng = np.random.default_rng(1)
  w = (rng.normal(size=(64, 5)) * w_scale).astype(np.float32)
  g = (rng.normal(size=(64, 5)) * g_scale).astype(np.float32)
  tx = lx.layca_sgd(0.2, per_neuron=per_neuron)
  state = tx.init({'kernel': jnp.asarray(w)})
  updates, state = jax.jit(tx.update)({'kernel': jnp.asarray(g)}, state,
                                      {'kernel': jnp.asarray(w)})
  new = np.asarray(optax.apply_updates({'kernel': jnp.asarray(w)}, updates)['kernel'])
  assert np.all(np.isfinite(new))
  columns = [slice(None)] if not per_neuron else [np.s_[:, j] for j in range(5)]
  for col in columns:
    w64 = w[col].astype(np.float64)
    want = reference.layca_step(w64, g[col].astype(np.float64),
                                np.linalg.norm(w64), 0.2)
    assert relative_error(new[col], want) < 1e-5


@pytest.mark.parametrize('make', [
    lambda: lx.layca_sgd(0.1),
    lambda: chain_of_links(optax.identity(), 0.1)], ids=['fused', 'links'])
def test_nearly_parallel_step_avoids_cancellation(make):
  """A step almost along the weights: |t|^2 = <d,d> - <d,w>^2/<w,w> would
  cancel (here to noise). The fast sums are taken on the step centred on a
  sampled estimate of <d,w>/<w,w>, so they keep the tangent's digits: the
  fast branch serves it, the layer still turns by atan(rate) and stays on
  its sphere."""
  rng = np.random.default_rng(2)
  w = rng.normal(size=(32, 16)).astype(np.float32)
  g = (3.0 * w + 1e-4 * rng.normal(size=w.shape)).astype(np.float32)
  sums = cf.tangent_sums(LayerSpec('k', w.shape, 0, False), jnp.asarray(w),
                          jnp.asarray(g), None)
  assert bool(cf.tangent_is_exact(sums))  # The fast branch serves it.
  tx = make()
  params = {'k': jnp.asarray(w)}
  updates, _ = tx.update({'k': jnp.asarray(g)}, tx.init(params), params)
  new = np.asarray(optax.apply_updates(params, updates)['k'])
  w64 = w.astype(np.float64)
  want = reference.layca_step(w64, g.astype(np.float64), np.linalg.norm(w64), 0.1)
  # The tangent is 3e-5 of the step: float32 itself keeps ~3 digits of it.
  assert relative_error(new, want) < 1e-3
  angle = lx.step_rotation(params, {'k': jnp.asarray(new)})['k']
  np.testing.assert_allclose(angle, math.atan(0.1), rtol=1e-3)
  # The centred sums and the elementwise pass form the tangent with exact
  # products, so the step stays orthogonal to the weights to rounding.
  np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(w), rtol=1e-6)
  # ... and every step measures |w| afresh, so it never accumulates.
  state, p = tx.init(params), params
  step = jax.jit(tx.update)
  for _ in range(50):
    updates, state = step({'k': jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(np.linalg.norm(p['k']), np.linalg.norm(w),
                             rtol=1e-6)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16), rate=st.floats(0.0, 3.0),
                  per_neuron=st.booleans())
def test_fast_and_careful_coefficients_agree(seed, rate, per_neuron):
  rng = np.random.default_rng(seed)
  spec = LayerSpec('k', (12, 4), 0, per_neuron)
  w = jnp.asarray(rng.normal(size=spec.shape), jnp.float32)
  d = jnp.asarray(rng.normal(size=spec.shape), jnp.float32)
  n0 = nx.from_units(nx.unit_norm(w, spec, None) * 1.5, spec)
  rate = jnp.full(spec.keepdims_shape, rate, jnp.float32)
  sums = cf.tangent_sums(spec, w, d, None)
  fast_ok = np.asarray(cf.tangent_is_exact(sums))
  fast = cf.fast_layca_update(sums, n0, rate)
  careful = cf.careful_layca_update(spec, w, d, n0, rate, None)
  u_fast = cf.apply_coefficients(fast, w, d, jnp.float32)
  u_careful = cf.apply_coefficients(careful, w, d, jnp.float32)
  keep = np.broadcast_to(fast_ok, spec.shape)
  np.testing.assert_allclose(np.where(keep, u_fast, 0), np.where(keep, u_careful, 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast.norm[fast_ok], careful.norm[fast_ok], rtol=1e-6)


@pytest.mark.parametrize('base', ['momentum', 'adam', 'rmsprop', 'adagrad', 'sgd'])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_gradient_skips_the_unit_and_spares_the_base_state(base, bad):
  rng = np.random.default_rng(3)
  shapes = {'a': (6, 5), 'b': (4, 3, 2), 'bias': (5,)}
  params = random_tree(rng, shapes)
  tx = BASES[base][0](0.1, per_neuron={'a': True, 'b': False, 'bias': False})
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = random_tree(rng, shapes)
  grads['a'] = grads['a'].at[2, 1].set(bad)  # Neuron 1 of 'a' only.
  grads['bias'] = grads['bias'].at[0].set(bad)  # Frozen leaf.
  updates, state = step(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['a'][:, 1], params['a'][:, 1])  # Kept.
  assert not np.allclose(new['a'][:, 0], params['a'][:, 0])          # Moved.
  assert not np.allclose(new['b'], params['b'])
  np.testing.assert_array_equal(new['bias'], params['bias'])         # Frozen.
  np.testing.assert_array_equal(lx.skipped_steps(state)['a'], [0, 1, 0, 0, 0])
  assert int(lx.skipped_steps(state)['b']) == 0
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf)), 'the base state was poisoned'
  # Later finite steps move the skipped neuron again.
  for _ in range(2):
    updates, state = step(random_tree(rng, shapes), state, new)
    new = optax.apply_updates(new, updates)
  assert np.all(np.isfinite(new['a']))
  assert not np.allclose(new['a'][:, 1], params['a'][:, 1])
  np.testing.assert_array_equal(lx.skipped_steps(state)['a'], [0, 1, 0, 0, 0])
  np.testing.assert_allclose(lx.norm_drift(state)['a'], 0.0, atol=1e-6)


@pytest.mark.parametrize('base', ['sgd', 'adam'])
def test_trained_non_layer_leaf_with_nan_gradient_keeps_its_values(base):
  rng = np.random.default_rng(4)
  params = random_tree(rng, {'k': (4, 4), 'bias': (4,)})
  tx = BASES[base][0](0.1, non_layer_learning_rate=0.5)
  state = tx.init(params)
  grads = {'k': jnp.ones((4, 4)), 'bias': jnp.array([1.0, np.nan, 0.0, 0.0])}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['bias'], 0.0)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))
  updates, state = tx.update({'k': jnp.ones((4, 4)), 'bias': jnp.ones(4)},
                             state, params)
  assert np.all(np.asarray(updates['bias']) < 0)  # Trained at the given rate.


def test_frozen_non_layer_leaves_get_zero_updates_and_zero_base_state():
  rng = np.random.default_rng(5)
  params = random_tree(rng, {'k': (4, 4), 'scale': (4,)})
  tx = lx.layca_adam(0.1)
  state = tx.init(params)
  grads = {'k': jnp.ones((4, 4)), 'scale': jnp.full(4, jnp.nan)}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates['scale'], 0.0)
  adam_state = state.base
  np.testing.assert_array_equal(adam_state.mu['scale'], 0.0)
  np.testing.assert_array_equal(adam_state.nu['scale'], 0.0)


def test_state_holds_a_layca_state_with_initial_norms():
  params = {'k': jnp.array([[3.0, 0.0], [0.0, 4.0]]), 'b': jnp.ones(2)}
  state = lx.layca_sgd(0.1, momentum=0.9).init(params)
  assert isinstance(state.layca, lx.LaycaState)
  np.testing.assert_allclose(state.layca.initial_norm['k'], 5.0)
  assert state.layca.initial_norm['b'] is None
  assert int(lx.skipped_steps(state)['k']) == 0


def test_zero_step_keeps_the_layer_and_its_norm():
  params = {'k': jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  tx = lx.layca_sgd(0.1)
  updates, state = tx.update({'k': jnp.zeros((2, 2))}, tx.init(params), params)
  np.testing.assert_allclose(updates['k'], 0.0, atol=1e-6)
  assert int(lx.skipped_steps(state)['k']) == 0


def test_tiny_step_that_underflows_when_squared_still_rotates():
  """Elements ~1e-25 square to 0 in float32; the careful branch still turns
  the layer by atan(rate)."""
  params = {'k': jnp.eye(3, dtype=jnp.float32)}
  grads = {'k': jnp.zeros((3, 3)).at[0, 1].set(1e-25)}
  tx = lx.layca_sgd(0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  angle = lx.step_rotation(params, new)['k']
  np.testing.assert_allclose(angle, math.atan(0.1), rtol=1e-5)


def test_schedule_rate_matches_the_chain():
  rng = np.random.default_rng(6)
  shapes = {'k': (5, 4)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(5)]
  schedule = optax.exponential_decay(0.3, 1, 0.5)
  p1, _, p2, _ = run_both(lx.layca_sgd(schedule),
                          chain_of_links(optax.identity(), schedule),
                          params, grads_seq)
  assert relative_error(p1['k'], p2['k']) < 1e-5


def branch_updates(recipe, spec, w, d, n0, *per_unit):
  """The update of ``recipe`` from its fast and from its careful branch."""
  sums = recipe.sums(spec, w, d, None)
  fast = recipe.fast(sums, n0, *per_unit)
  careful = recipe.careful(spec, w, d, n0, *per_unit, None)
  return (np.asarray(recipe.is_exact(sums)),
          cf.apply_coefficients(fast, w, d, jnp.float32),
          cf.apply_coefficients(careful, w, d, jnp.float32))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16), per_neuron=st.booleans(),
                  step_scale=st.sampled_from([1e-3, 1.0, 1e3]),
                  multiplier=st.floats(0.0, 3.0))
def test_link_branches_agree(seed, per_neuron, step_scale, multiplier):
  """The links' fast branch (plain sums) and careful branch (scaled sums,
  measured tangent) give the same update wherever the fast one is used."""
  rng = np.random.default_rng(seed)
  spec = LayerSpec('k', (12, 4), 0, per_neuron)
  w = jnp.asarray(rng.normal(size=spec.shape), jnp.float32)
  d = jnp.asarray(rng.normal(size=spec.shape) * step_scale, jnp.float32)
  n0 = nx.from_units(nx.unit_norm(w, spec, None) * 1.5, spec)
  m = jnp.full(spec.keepdims_shape, multiplier, jnp.float32)
  for recipe, extra in ((cf.LAYCA_STEP, (m,)), (cf.BACK_ON_SPHERE, ())):
    exact, fast, careful = branch_updates(recipe, spec, w, d, n0, *extra)
    assert exact.all()  # Ordinary values take the fast branch.
    scale = float(np.max(np.abs(careful))) + 1e-30
    np.testing.assert_allclose(fast, careful, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize('careful', [False, True])
def test_keep_norm_keeps_a_layer_with_a_zero_update_bit_for_bit(careful):
  """Both branches: a zero update (a frozen or skipped layer) leaves the
  weights exactly as they are, instead of rescaling them by ~1. A huge
  gradient on another layer sends the whole tree down the careful branch."""
  rng = np.random.default_rng(7)
  params = random_tree(rng, {'frozen': (5, 4), 'other': (3, 3)})
  grads = {'frozen': jnp.zeros((5, 4)),
           'other': random_tree(rng, {'o': (3, 3)}, 1e30 if careful else 1.0)['o']}
  tx = optax.chain(optax.sgd(0.1), lx.keep_norm())
  sums = cf.sphere_sums(LayerSpec('other', (3, 3), 0, False), params['other'],
                        -0.1 * grads['other'], None)
  assert bool(cf.sphere_is_exact(sums)) is not careful
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['frozen'], params['frozen'])
  np.testing.assert_allclose(np.linalg.norm(new['other']),
                             np.linalg.norm(params['other']), rtol=1e-6)


# ---------------------------------------------------------------------------
# No cliff: the states real training reaches stay on the fast branch.


_WARM_SHAPES = [(int(a), int(b)) for a, b in zip(
    np.random.default_rng(8).integers(3, 90, size=24),
    np.random.default_rng(9).integers(2, 40, size=24))]


def _warm_tree(rng, scale):
  """A many-leaf tree of the directions warm training produces, per neuron:
  dead units (zero steps), stale momentum (steps within 1e-6 to 1e-1 rad of
  the weights), decayed momentum of dead units (entries down to 1e-37),
  zero-initialised units, and ordinary steps; weights at ``scale``. The
  shapes are fixed (one compilation), the values drawn from ``rng``."""
  w_leaves, d_leaves = {}, {}
  for i, (fan_in, fan_out) in enumerate(_WARM_SHAPES):
    w = rng.normal(size=(fan_in, fan_out)) * scale
    d = rng.normal(size=w.shape) * rng.choice([1e-3, 1.0, 1e3])
    kind = rng.integers(0, 5, size=fan_out)
    for j, k in enumerate(kind):
      if k == 0:
        d[:, j] = 0.0
      elif k == 1:
        sine = 10.0 ** rng.uniform(-6, -1)
        d[:, j] = (-2.5 * w[:, j] / np.linalg.norm(w[:, j])
                   + sine * rng.normal(size=fan_in) / np.sqrt(fan_in))
        d[:, j] *= 10.0 ** rng.uniform(-3, 3)
      elif k == 2:
        d[:, j] = rng.normal(size=fan_in) * 10.0 ** rng.uniform(-37, -20)
      elif k == 3 and i % 3 == 0:
        w[:, j] = 0.0
    # XLA on CPU and TPU flushes subnormal inputs to zero: give the float64
    # reference the values the device sees.
    tiny = np.finfo(np.float32).tiny
    w, d = np.float32(w), np.float32(d)
    w_leaves[f'Dense_{i}'] = np.where(np.abs(w) < tiny, np.float32(0), w)
    d_leaves[f'Dense_{i}'] = np.where(np.abs(d) < tiny, np.float32(0), d)
  return w_leaves, d_leaves


@functools.lru_cache(maxsize=None)
def _fast_serves_per_unit(recipe):
  """Per leaf of a warm tree, whether the fast branch serves each unit: one
  jitted program per recipe (the warm trees share their shapes)."""
  specs = [LayerSpec(f'Dense_{i}', shape, 0, True)
           for i, shape in enumerate(_WARM_SHAPES)]

  def serves(w_leaves, d_leaves):
    out = {}
    for spec in specs:
      w, d = w_leaves[spec.path], d_leaves[spec.path]
      n0 = nx.from_units(nx.unit_norm(w, spec, None), spec)
      out[spec.path] = cf.fast_serves(recipe, recipe.sums(spec, w, d, None), n0)
    return out

  return jax.jit(serves)


@pytest.mark.parametrize('scale', [1e-12, 1.0, 1e12])
def test_warm_training_states_keep_the_fast_branch(scale):
  """The decision the whole-tree switch takes (``use_fast``), read on a
  large tree of dead, stale, decayed, free and ordinary units."""
  w_leaves, d_leaves = _warm_tree(np.random.default_rng(8), scale)
  for recipe in (cf.LAYCA_UPDATE, cf.LAYCA_STEP):
    serves = _fast_serves_per_unit(recipe)(w_leaves, d_leaves)
    assert all(np.all(s) for s in serves.values()), {
        k: float(np.mean(s)) for k, s in serves.items()}


@functools.lru_cache(maxsize=None)
def _warm_optimizer():
  """Per-neuron Layca-SGD with its rate in the state (one compilation for
  every rate) and its jitted update."""
  tx = optax.inject_hyperparams(
      lx.layca_sgd, static_args=('momentum', 'nesterov', 'per_neuron'))(
          learning_rate=0.1, per_neuron=True)
  return tx, jax.jit(tx.update)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  w_exp=st.sampled_from([-40, -10, 0, 10, 40]),
                  rate=st.sampled_from([3.0 ** -5, 3.0 ** -3, 0.3]))
def test_fast_branch_on_warm_states_follows_algorithm1(seed, w_exp, rate):
  """Every unit of a warm tree against Algorithm 1 in float64: turned by
  atan(rate) along the true tangent, kept on its sphere; dead units keep
  their weights; free units step by -rate * d."""
  w_leaves, d_leaves = _warm_tree(np.random.default_rng(seed), 2.0 ** w_exp)
  params = {k: jnp.asarray(v) for k, v in w_leaves.items()}
  grads = {k: jnp.asarray(v) for k, v in d_leaves.items()}
  tx, update = _warm_optimizer()
  state = tx.init(params)
  state.hyperparams['learning_rate'] = jnp.asarray(rate, jnp.float32)
  updates, state = update(grads, state, params)
  assert np.asarray(state.inner_state.layca.skipped['Dense_0']).sum() == 0
  for name, w in w_leaves.items():
    new = np.asarray(params[name] + updates[name], np.float64)
    w64, d64 = w.astype(np.float64), d_leaves[name].astype(np.float64)
    for j in range(w.shape[1]):
      n0 = np.linalg.norm(w64[:, j])
      if n0 == 0:   # A free unit.
        np.testing.assert_allclose(new[:, j], -rate * d64[:, j], rtol=1e-6,
                                   atol=1e-30)
        continue
      want = reference.layca_step(w64[:, j], d64[:, j], n0, rate)
      # Steps parallel to the weights within rounding are no step (both
      # sides agree on a tolerance here, so compare where the tangent is
      # clear of it).
      t = d64[:, j] - (d64[:, j] @ w64[:, j]) / n0 ** 2 * w64[:, j]
      if np.linalg.norm(t) <= 1e-5 * np.linalg.norm(d64[:, j]):
        continue
      np.testing.assert_allclose(np.linalg.norm(new[:, j]), n0, rtol=1e-6)
      np.testing.assert_allclose(new[:, j], want, rtol=0,
                                 atol=2e-4 * n0, err_msg=f'{name}:{j}')


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  scales=st.lists(st.integers(-120, 120), min_size=4,
                                  max_size=4))
def test_estimates_of_a_group_are_each_leafs_own(seed, scales):
  """The samples of all leaves are laid end to end for one set of
  statistics (zero-padded to the sample size): each leaf gets exactly the
  estimates it gets alone, whatever its unit count, sample size (below and
  above _SAMPLE_SIZE), stacking or scale."""
  rng = np.random.default_rng(seed)
  specs = [LayerSpec('a', (3, 5), 0, False), LayerSpec('b', (40, 30), 0, True),
           LayerSpec('c', (2, 9, 16, 8), 1, True),
           LayerSpec('d', (4, 300), 1, False)]
  ws, ds = [], []
  for spec, e in zip(specs, scales):
    w = rng.normal(size=spec.shape)
    d = 3.0 * w + rng.normal(size=spec.shape) * 10.0 ** rng.uniform(-6, 0)
    ws.append(jnp.asarray(np.ldexp(w, e), jnp.float32))
    ds.append(jnp.asarray(np.ldexp(d, -e), jnp.float32))
  layout = cf.UnitLayout(specs)
  together = zip(*map(layout.split, cf.sample_estimates(specs, ws, ds, None)))
  for spec, w, d, group in zip(specs, ws, ds, together):
    alone = cf.sample_estimates([spec], [w], [d], None)
    for x, y in zip(group, alone):
      assert x.shape == spec.keepdims_shape
      np.testing.assert_array_equal(x.ravel(), y)


# ---------------------------------------------------------------------------
# Units the sample misses: the refined branch.


_SPARSE_SHAPES = {'sparse': (512, 6), 'ordinary': (48, 5)}


def _sparse_tree(rng, w_scale, d_scale):
  """Per-neuron units whose few large entries the sample misses: each unit
  of ``sparse`` is fed by four live inputs outside its sample (weights
  ~``w_scale``, the rest 1e-6 of that), its step there either ordinary or
  stale momentum nearly along the live weights (1e-6 to 1e-2 rad), and
  ~1e-20 of ``d_scale`` elsewhere (momentum decayed at dead inputs): the
  sample's scales are off by 2^20 (weights) and 2^60 (steps), and its
  centre is meaningless. The units of ``ordinary`` are plain. Float32
  values with subnormals flushed, as the device sees them."""
  fan_in, units = _SPARSE_SHAPES['sparse']
  unsampled = sorted(set(range(fan_in)) - set(cf._sample_positions(fan_in)))
  w = rng.normal(size=(fan_in, units)) * 1e-6
  d = rng.normal(size=(fan_in, units)) * 1e-20
  for j in range(units):
    live = rng.choice(unsampled, size=4, replace=False)
    w[live, j] = rng.normal(size=4)
    if j % 2:
      d[live, j] = rng.normal(size=4)
    else:
      unit = w[live, j] / np.linalg.norm(w[live, j])
      noise = rng.normal(size=4)
      noise -= (noise @ unit) * unit
      angle = 10.0 ** rng.uniform(-6, -2)
      d[live, j] = (-np.cos(angle) * unit
                    + np.sin(angle) * noise / np.linalg.norm(noise))
  trees = {'sparse': (w * w_scale, d * d_scale)}
  shape = _SPARSE_SHAPES['ordinary']
  trees['ordinary'] = (rng.normal(size=shape) * w_scale,
                       rng.normal(size=shape) * d_scale)
  tiny = np.finfo(np.float32).tiny
  flush = lambda x: np.where(np.abs(np.float32(x)) < tiny, np.float32(0),
                             np.float32(x))
  return ({k: flush(w) for k, (w, _) in trees.items()},
          {k: flush(d) for k, (_, d) in trees.items()})


@functools.lru_cache(maxsize=None)
def _update_and_branches(make):
  """``make()``'s jitted update (its rate a hyperparameter), returning the
  branches its switches took beside the updates."""
  tx = make()

  @jax.jit
  def update(params, grads, rate):
    state = tx.init(params)
    state.hyperparams['learning_rate'] = rate
    with cf.recording_branches() as branches:
      updates, _ = tx.update(grads, state, params)
    return updates, list(branches)

  return lambda params, grads, rate: update(params, grads,
                                            jnp.asarray(rate, jnp.float32))


_SPARSE_OPTIMIZERS = {
    'fused': lambda: optax.inject_hyperparams(
        lx.layca_sgd, static_args=('momentum', 'nesterov', 'per_neuron'))(
            learning_rate=0.1, per_neuron=True),
    'links': lambda: optax.inject_hyperparams(
        lambda learning_rate: chain_of_links(optax.identity(), learning_rate,
                                             per_neuron=True))(
            learning_rate=0.1),
}


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  w_exp=st.sampled_from([-30, 0, 30]),
                  d_exp=st.sampled_from([-40, 0, 40]),
                  rate=st.sampled_from([3.0 ** -5, 3.0 ** -3, 0.3]),
                  kind=st.sampled_from(sorted(_SPARSE_OPTIMIZERS)))
def test_units_the_sample_misses_take_the_refined_branch(seed, w_exp, d_exp,
                                                          rate, kind):
  """Sparse units whose large entries the sample misses (its scales off by
  2^20 and 2^60, stale momentum nearly along the weights), with weights at
  2^-30 to 2^30 and steps at 2^-40 to 2^40, are served by the refined
  branch, not the careful one, and every unit follows Algorithm 1 in
  float64."""
  w_leaves, d_leaves = _sparse_tree(np.random.default_rng(seed),
                                    2.0 ** w_exp, 2.0 ** d_exp)
  params = {k: jnp.asarray(v) for k, v in w_leaves.items()}
  grads = {k: jnp.asarray(v) for k, v in d_leaves.items()}
  first = cf.fast_serves(
      cf.LAYCA_UPDATE, cf.tangent_sums(
          LayerSpec('sparse', params['sparse'].shape, 0, True),
          params['sparse'], grads['sparse'], None), jnp.float32(1.0))
  assert not np.any(first), 'the sample was meant to miss every sparse unit'
  updates, branches = _update_and_branches(_SPARSE_OPTIMIZERS[kind])(
      params, grads, rate)
  # The tangent step's switch (the links' keep_norm has a switch of its own).
  assert int(branches[0]) == cf.REFINED
  for name, w in w_leaves.items():
    new = np.asarray(params[name] + updates[name], np.float64)
    w64, d64 = w.astype(np.float64), d_leaves[name].astype(np.float64)
    for j in range(w.shape[1]):
      n0 = np.linalg.norm(w64[:, j])
      want = reference.layca_step(w64[:, j], d64[:, j], n0, rate)
      np.testing.assert_allclose(np.linalg.norm(new[:, j]), n0, rtol=1e-6)
      np.testing.assert_allclose(new[:, j], want, rtol=0, atol=2e-5 * n0,
                                 err_msg=f'{name}:{j}')


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
def test_sparse_units_with_weights_far_from_unit_scale(platform, monkeypatch):
  """Sparse units (as above) and ordinary ones whose weights sit at 2^-60,
  below the band where XLA:CPU's layout reads weights as they are (their
  units are not served there): the refined branch serves the tree on every
  layout, and every unit follows Algorithm 1."""
  monkeypatch.setattr(cf, 'compiling_for', lambda: platform)
  w_leaves, d_leaves = _sparse_tree(np.random.default_rng(3), 2.0 ** -60, 1.0)
  params = {k: jnp.asarray(v) for k, v in w_leaves.items()}
  grads = {k: jnp.asarray(v) for k, v in d_leaves.items()}
  tx = lx.layca_sgd(0.1, per_neuron=True)

  @jax.jit
  def update(params, grads):
    with cf.recording_branches() as branches:
      updates, _ = tx.update(grads, tx.init(params), params)
    return updates, list(branches)

  updates, branches = update(params, grads)
  # One switch for the tree; one per leaf on TPU ('ordinary' first).
  assert [int(b) for b in branches] == (
      [cf.FAST, cf.REFINED] if platform == 'tpu' else [cf.REFINED])
  for name, w in w_leaves.items():
    new = np.asarray(params[name] + updates[name], np.float64)
    w64, d64 = w.astype(np.float64), d_leaves[name].astype(np.float64)
    for j in range(w.shape[1]):
      n0 = np.linalg.norm(w64[:, j])
      want = reference.layca_step(w64[:, j], d64[:, j], n0, 0.1)
      np.testing.assert_allclose(new[:, j], want, rtol=0, atol=2e-5 * n0,
                                 err_msg=f'{name}:{j}')


def test_what_the_refined_branch_cannot_serve_takes_the_careful_one():
  """A unit whose weights became zero (pruned after init) is out of reach of
  both fast passes: the careful branch serves the tree, the unit keeps its
  (zero) weights and the other units follow Algorithm 1."""
  rng = np.random.default_rng(11)
  init = rng.normal(size=(40, 6)).astype(np.float32)
  w = rng.normal(size=(40, 6)).astype(np.float32)
  d = rng.normal(size=(40, 6)).astype(np.float32)
  w[:, 2] = 0.0
  params, grads = {'k': jnp.asarray(w)}, {'k': jnp.asarray(d)}
  tx = lx.layca_sgd(0.1, per_neuron=True)
  with cf.recording_branches() as branches:
    updates, _ = tx.update(grads, tx.init({'k': jnp.asarray(init)}), params)
  assert [int(b) for b in branches] == [cf.CAREFUL]
  new = np.asarray(params['k'] + updates['k'], np.float64)
  np.testing.assert_array_equal(new[:, 2], 0.0)
  for j in (0, 1, 3, 4, 5):
    n0 = np.linalg.norm(init[:, j].astype(np.float64))
    want = reference.layca_step(w[:, j], d[:, j], n0, 0.1)
    np.testing.assert_allclose(new[:, j], want, rtol=0, atol=2e-6 * n0)


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
def test_leaves_on_different_mesh_axes_update_as_unsplit(platform,
                                                         monkeypatch):
  """Leaves reduced over different mesh axes (one split along the vmapped
  axis ``x``, one whole) take their estimates per axis and are laid end to
  end again: the update is that of the unsplit tree, in each platform's
  layout."""
  monkeypatch.setattr(cf, 'compiling_for', lambda: platform)
  rng = np.random.default_rng(8)
  params = {'a': jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
  grads = jax.tree.map(lambda x: jnp.asarray(
      rng.normal(size=x.shape), jnp.float32), params)
  want, _ = lx.layca_sgd(0.1).update(grads, lx.layca_sgd(0.1).init(params),
                                     params)
  tx = lx.layca_sgd(0.1, axis_name={'a': 'x', 'b': None})
  split = lambda tree: {'a': tree['a'].reshape(2, 4, 6), 'b': tree['b']}

  def update(params, grads):
    return tx.update(grads, tx.init(params), params)[0]

  got = jax.jit(jax.vmap(update, in_axes=({'a': 0, 'b': None},) * 2,
                         axis_name='x', out_axes={'a': 0, 'b': None}))(
                             split(params), split(grads))
  np.testing.assert_allclose(got['a'].reshape(8, 6), want['a'], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(got['b'], want['b'], rtol=1e-5, atol=1e-7)


def _raw_sums_case(seed, w_exp, d_exp, per_neuron, parallel=False):
  """A stacked leaf at scales 2^w_exp, 2^d_exp, one unit with a zero step
  (and with ``parallel``, one with a step along its weights), its estimates."""
  rng = np.random.default_rng(seed)
  spec = LayerSpec('k', (2, 24, 10), 1, per_neuron)
  w = np.ldexp(rng.normal(size=spec.shape), w_exp)
  d = np.ldexp(rng.normal(size=spec.shape), d_exp)
  d[0, :, 0] = 0.0
  if parallel:
    d[1] = np.ldexp(w[1], d_exp - w_exp) * (1.0 + 1e-4 * rng.normal(
        size=w[1].shape))
  w, d = jnp.asarray(w, jnp.float32), jnp.asarray(d, jnp.float32)
  estimates = tuple(x.reshape(spec.keepdims_shape)
                    for x in cf.sample_estimates([spec], [w], [d], None))
  return spec, w, d, estimates


def _raw_form(spec, w, d, axis_name, estimates):
  """What XLA:CPU is given: the raw sums, scaled afterwards."""
  raw = cf.raw_tangent_sums(spec, w, d, axis_name)
  return cf.scale_raw_tangent_sums(raw, estimates)


def _assert_scaled_sums(form, spec, w, d, estimates):
  """``form(spec, w, d, None, estimates)`` gives the sums of the scaled,
  centred form (:func:`cf.tangent_sums`) to float32 rounding."""
  both = [jax.jit(f, static_argnums=(0, 3))(spec, w, d, None, estimates)
          for f in (cf.tangent_sums, form)]
  (ww, ew, ee), (ww2, ew2, ee2) = (sums[:3] for sums in both)
  np.testing.assert_allclose(ww2, ww, rtol=1e-6, atol=0)
  np.testing.assert_allclose(ee2, ee, rtol=1e-6, atol=0)
  # A signed sum: rounding relative to the terms' size, not to the sum's.
  assert np.all(np.abs(ew2 - ew) <= 1e-6 * np.sqrt(ww * ee))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  w_exp=st.integers(-30, 30), d_exp=st.integers(-30, 30),
                  per_neuron=st.booleans())
def test_raw_sums_are_the_scaled_sums_where_they_serve(
    seed, w_exp, d_exp, per_neuron):
  """Where no unit is centred and the sample's peaks are in band, the sums
  read from the raw inputs (what XLA:CPU is given) are those of the scaled,
  centred form to float32 rounding, zero units included."""
  spec, w, d, estimates = _raw_sums_case(seed, w_exp, d_exp, per_neuron)
  band = cf.raw_exponent_band([spec], jnp.float32)
  assert cf.raw_sums_serve(estimates, band)
  _assert_scaled_sums(_raw_form, spec, w, d, estimates)


@pytest.mark.parametrize('w_exp,d_exp,parallel', [
    (0, -60, False), (0, 70, False), (-60, 0, False), (70, 0, False),
    (0, -3, True)])
def test_raw_sums_do_not_serve_far_from_unit_scale_or_a_centred_unit(
    w_exp, d_exp, parallel):
  """Peaks out of band (where plain float32 products would flush terms
  that matter, or overflow) or a unit to centre: the scaled form serves."""
  spec, _, _, estimates = _raw_sums_case(0, w_exp, d_exp, True, parallel)
  band = cf.raw_exponent_band([spec], jnp.float32)
  assert not cf.raw_sums_serve(estimates, band)
  if parallel:
    assert np.any(estimates[-1] != 0)


def _raw_weights_form(spec, w, d, axis_name, estimates):
  """What XLA:CPU is given for units to centre: the sums with the weights
  as they are, scaled afterwards."""
  raw = cf.raw_weights_tangent_sums(spec, w, d, axis_name, estimates)
  return cf.scale_raw_weights_tangent_sums(
      raw, estimates, cf.raw_exponent_band([spec], jnp.float32))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  w_exp=st.integers(-30, 30), d_exp=st.integers(-120, 120),
                  per_neuron=st.booleans(), parallel=st.booleans())
def test_raw_weights_sums_are_the_scaled_sums_for_weights_in_band(
    seed, w_exp, d_exp, per_neuron, parallel):
  """With the weights' sample peaks in band, the sums read with the
  weights as they are (the step scaled and centred) are those of the
  scaled form to float32 rounding, at any scale of the step, with units to
  centre (a step along the weights to 1e-4) and zero steps."""
  spec, w, d, estimates = _raw_sums_case(seed, w_exp, d_exp, per_neuron,
                                         parallel)
  if parallel:
    assert np.any(estimates[-1] != 0)
  _assert_scaled_sums(_raw_weights_form, spec, w, d, estimates)


@pytest.mark.parametrize('w_exp', [-60, 70])
def test_raw_weights_sums_do_not_serve_weights_far_from_unit_scale(w_exp):
  """Weights out of band: their units are not served (``ew`` NaN: the
  refined branch), and a free unit's rule still holds: ``ee`` is finite,
  ``ww`` not NaN (Inf where huge weights' squares overflow)."""
  spec, w, d, estimates = _raw_sums_case(0, w_exp, 0, True, True)
  sums = _raw_weights_form(spec, w, d, None, estimates)
  assert np.all(np.isnan(sums.ew))
  assert not np.any(cf.tangent_is_exact(sums))
  assert np.all(np.isfinite(sums.ee)) and not np.any(np.isnan(sums.ww))
  free = cf._tangent_free(sums, jnp.float32(-0.1))
  assert np.all(free.finite) and np.all(free.moves)


@pytest.mark.parametrize('platform', ['cpu', 'gpu', 'tpu'])
@pytest.mark.parametrize('scale', [2.0 ** -70, 2.0 ** 70])
def test_free_units_far_from_unit_scale_step_by_their_direction(
    platform, scale, monkeypatch):
  """Free units (zero at init) whose weights grew huge or stayed tiny step
  by ``-rate * d`` on every layout (on XLA:CPU their ``<w,w>`` read as they
  are may overflow or underflow), beside units that rotate."""
  monkeypatch.setattr(cf, 'compiling_for', lambda: platform)
  rng = np.random.default_rng(4)
  init = rng.normal(size=(16, 4)).astype(np.float32)
  init[:, :2] = 0.0
  w = rng.normal(size=(16, 4)).astype(np.float32)
  w[:, :2] *= scale
  g = rng.normal(size=(16, 4)).astype(np.float32)
  tx = lx.layca_sgd(0.1, per_neuron=True)
  updates, _ = jax.jit(tx.update)({'k': jnp.asarray(g)},
                                  tx.init({'k': jnp.asarray(init)}),
                                  {'k': jnp.asarray(w)})
  updates = np.asarray(updates['k'])
  np.testing.assert_allclose(updates[:, :2], -0.1 * g[:, :2], rtol=1e-6)
  for j in (2, 3):
    n0 = np.linalg.norm(init[:, j].astype(np.float64))
    want = reference.layca_step(w[:, j].astype(np.float64),
                                g[:, j].astype(np.float64), n0, 0.1)
    np.testing.assert_allclose(w[:, j] + updates[:, j], want, rtol=0,
                               atol=2e-6 * n0)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU layout')
def test_on_xla_cpu_each_raw_sum_reads_the_inputs():
  """The reason for the raw forms: XLA:CPU writes out the scaled weights and
  the centred step that the scaled form's sums share (arrays the size of the
  leaf), nothing of that size in the raw form, and only the centred step
  where the weights are read as they are."""
  spec = LayerSpec('k', (256, 128), 0, False)
  w = jnp.ones(spec.shape)
  d = jnp.full(spec.shape, 0.5)
  estimates = tuple(x.reshape(spec.keepdims_shape)
                    for x in cf.sample_estimates([spec], [w], [d], None))

  def leaf_sized_results(form):
    fn = jax.jit(lambda w, d, e: form(spec, w, d, None, e)[:3])
    hlo = fn.lower(w, d, estimates).compile().as_text()
    entry = hlo[hlo.index('ENTRY'):]
    return sum(1 for line in entry.splitlines()
               if ' fusion(' in line and '[256,128]' in line.split('=')[1]
               .split('fusion(')[0])

  scaled = leaf_sized_results(cf.tangent_sums)
  assert scaled >= 2
  assert leaf_sized_results(_raw_form) == 0
  # Units to centre: only the centred step, which two sums share, is
  # written out when the weights are read as they are.
  assert leaf_sized_results(_raw_weights_form) == 1 < scaled


@pytest.mark.parametrize('base,platform', [('adam', 'cpu'),
                                           ('momentum', 'gpu')])
def test_vmapped_and_differentiated_updates(base, platform, monkeypatch):
  """An ensemble (``jax.vmap`` over members on the fast and the refined
  branch) gets each member's own update, and an update on the
  refined branch can be differentiated in forward and reverse mode
  (``jax.jvp``, ``jax.grad``, as meta-learning does), with conditionals for
  the switches (XLA:CPU, XLA:TPU) and with XLA:GPU's loops around the
  branches after the fast one: those loops (one inside another) and the
  barrier that makes a stateful base's direction be computed once are
  transparent to all three."""
  monkeypatch.setattr(cf, 'compiling_for', lambda: platform)
  rng = np.random.default_rng(5)
  members = [{'k': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              'b': jnp.zeros(8)} for _ in range(3)]
  grads = [{k: rng.normal(size=x.shape).astype(np.float32)
            for k, x in m.items()} for m in members]
  # The second member's step takes the refined branch (the sample of its
  # weights sees only entries 1e-16 of the rest), the others the fast one
  # (the third's NaN step is skipped before the base): switches with a
  # batched predicate.
  members[1]['k'] = members[1]['k'].at[np.unravel_index(
      cf._sample_positions(16 * 8), (16, 8))].multiply(1e-16)
  grads[2]['k'][5, 3] = np.nan
  grads = [jax.tree.map(jnp.asarray, g) for g in grads]
  tx = BASES[base][0](0.1)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

  def step(params, grads):
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, optax.apply_updates(params, updates))
    return updates

  batched = jax.vmap(step)(stack(members), stack(grads))
  for i, (p, g) in enumerate(zip(members, grads)):
    with cf.recording_branches() as branches:
      alone = step(p, g)
    assert int(branches[0]) == (cf.FAST, cf.REFINED, cf.FAST)[i]
    # To float32 rounding: batched sums may add in another order.
    np.testing.assert_allclose(batched['k'][i], alone['k'], rtol=1e-5,
                               atol=1e-6)
  tangent = jax.tree.map(jnp.ones_like, grads[1])
  value, derivative = jax.jvp(lambda g: step(members[1], g), (grads[1],),
                              (tangent,))
  # The jvp's primal is the update, to float32 rounding (on XLA:GPU's
  # layout the update runs compiled, the jvp op by op).
  np.testing.assert_allclose(value['k'], step(members[1], grads[1])['k'],
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(derivative['k']))
  # Reverse mode agrees with forward mode: <grad of <u, v>, t> is the
  # derivative of <u, v> along t (~0 for Adam, whose first steps are signs).
  v, t = (jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                             jnp.float32), grads[1])
          for _ in range(2))
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                                        jax.tree.leaves(b)))
  scalar = lambda g: dot(step(members[1], g), v)
  along = float(dot(jax.jit(jax.grad(scalar))(grads[1]), t))
  forward = float(jax.jvp(scalar, (grads[1],), (t,))[1])
  assert abs(along - forward) <= 1e-4 * abs(forward) + 1e-5
  if base == 'momentum':
    assert abs(forward) > 0.1


@pytest.mark.parametrize('make', [
    lambda: lx.layca_sgd(0.1),
    lambda: chain_of_links(optax.identity(), 0.1)], ids=['fused', 'links'])
def test_a_switch_per_leaf_keeps_the_other_leaves_fast(make, monkeypatch):
  """With one switch per leaf (what a TPU backend traces: leaves stay on
  chip), a leaf whose sample misjudges it (one entry 2^70 outside its
  sample) takes the refined branch alone, the other leaf keeps the fast
  one, and the update is the whole-tree switch's and Algorithm 1's."""
  rng = np.random.default_rng(4)
  w = {'a': rng.normal(size=(8, 6)), 'b': rng.normal(size=(16, 8))}
  g = {k: rng.normal(size=v.shape) for k, v in w.items()}
  unsampled = sorted(set(range(16 * 8)) - set(cf._sample_positions(16 * 8)))
  g['b'].flat[unsampled[0]] = 2.0 ** 70
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  grads = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}

  def update(per_leaf):
    monkeypatch.setattr(cf, 'compiling_for',
                        lambda: 'tpu' if per_leaf else 'gpu')
    tx = make()
    with cf.recording_branches() as branches:
      updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), [int(b) for b in branches]

  per_leaf, per_leaf_branches = update(True)
  whole, whole_branches = update(False)
  # The tangent step's switches come first (keep_norm's follow in the chain).
  assert whole_branches[0] == cf.REFINED
  assert per_leaf_branches[:2] == [cf.FAST, cf.REFINED]
  for k in w:
    want = reference.layca_step(w[k], g[k], np.linalg.norm(w[k]), 0.1)
    assert relative_error(per_leaf[k], want) < 1e-5
    assert relative_error(per_leaf[k], whole[k]) < 1e-5


def primitive_counts(jaxpr) -> collections.Counter:
  """How many times each primitive occurs in ``jaxpr`` and its sub-jaxprs."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          counts += primitive_counts(sub)
  return counts


@pytest.mark.parametrize('base,refined', [
    ('momentum', False), ('adam', False), ('momentum', True)],
    ids=['momentum', 'adam', 'momentum-refined'])
def test_each_platform_lays_out_the_same_update(base, refined, monkeypatch):
  """Traced for XLA:TPU (``leaves_stay_on_chip``), nothing waits on the whole
  tree: one switch per layer leaf and no barrier on the base's direction.
  For XLA:GPU one barrier (the direction computed once) and one switch, a
  loop of at most one trip (``conditionals_run_both_branches``) around
  each branch after the fast one; for XLA:CPU conditionals, and one more
  choosing to read the sums raw (``shared_operands_cost_a_pass``). The
  same update on all three, also where a unit takes the refined branch (a
  gradient entry 2^70 outside the sample)."""
  rng = np.random.default_rng(6)
  params = {'a': rng.normal(size=(8, 6)), 'b': rng.normal(size=(16, 8)),
            'bias': np.zeros(8)}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = {k: rng.normal(size=x.shape) for k, x in params.items()}
  if refined:
    unsampled = sorted(set(range(16 * 8)) - set(cf._sample_positions(16 * 8)))
    grads['b'].flat[unsampled[0]] = 2.0 ** 70
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)

  def traced(platform):
    monkeypatch.setattr(cf, 'compiling_for', lambda: platform)
    tx = BASES[base][0](0.1)

    def step(params, grads):
      updates, state = tx.update(grads, tx.init(params), params)
      return tx.update(grads, state, optax.apply_updates(params, updates))[0]

    return (primitive_counts(jax.make_jaxpr(step)(params, grads).jaxpr),
            jax.jit(step)(params, grads))

  (tpu, tpu_updates), (gpu, updates), (cpu, cpu_updates) = map(
      traced, ['tpu', 'gpu', 'cpu'])
  # Per switch and update: the fast/refined switch, a switch per leaf in
  # the refined branch (not for a switch of one leaf, nor on XLA:GPU, where
  # it would cost the host a read per leaf), and its refined/careful switch.
  assert tpu['cond'] == 2 * 2 * 2 and 'optimization_barrier' not in tpu
  assert gpu['while'] == 2 * 2 and 'cond' not in gpu
  assert gpu['optimization_barrier'] == 2
  assert cpu['cond'] == 2 * (1 + 2 + 2) and cpu['optimization_barrier'] == 2
  for k in params:
    assert np.all(np.isfinite(updates[k]))
    for other in (tpu_updates, cpu_updates):
      # To float32 rounding of updates ~0.1 (the careful branch rounds
      # differently per layout); forcing the fast branch there errs by ~1.
      np.testing.assert_allclose(other[k], updates[k], rtol=1e-6, atol=5e-7)
