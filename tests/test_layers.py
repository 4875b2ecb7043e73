"""The layer/unit model: which leaves are layers, how they split, their order, and alpha."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layca_jax as lx
from layca_jax import _layers


def _paths(specs):
  return [s.path for s in specs if s is not None]


def test_default_layers_are_floating_leaves_with_ndim_at_least_2():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4)), 'bias': jnp.ones(4)},
            'embed': {'embedding': jnp.ones((10, 4))},
            'bn': {'scale': jnp.ones(4)},
            'step': jnp.zeros((2, 2), jnp.int32),
            'flags': jnp.zeros((2, 2), bool)}
  assert _paths(lx.layer_specs(params)) == ['conv/kernel', 'embed/embedding']


@pytest.mark.parametrize('as_callable', [False, True])
def test_mask_overrides_the_default(as_callable):
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'head': {'kernel': jnp.ones((4, 2))}}
  mask = {'dense': {'kernel': False, 'bias': True}, 'head': {'kernel': True}}
  specs = lx.layer_specs(params, mask=(lambda p: mask) if as_callable else mask)
  assert _paths(specs) == ['dense/bias', 'head/kernel']


def test_mask_prefix_broadcasts_over_subtrees():
  params = {'encoder': {'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 2))},
            'decoder': {'a': jnp.ones((2, 2))}}
  specs = lx.layer_specs(params, mask={'encoder': True, 'decoder': False})
  assert _paths(specs) == ['encoder/a', 'encoder/b']


def test_integer_leaves_are_never_layers_even_when_masked():
  params = {'w': jnp.ones((2, 2), jnp.int32)}
  assert lx.layer_specs(params, mask={'w': True}) == [None]


def test_units_per_neuron_and_stacked():
  kernel = jnp.ones((5, 3, 3, 2, 4))  # 5 stacked conv layers.
  (spec,) = lx.layer_specs({'k': kernel}, stack_axes=1, per_neuron=True)
  assert spec.reduce_axes == (1, 2, 3)
  assert spec.unit_shape == (5, 4)
  assert spec.stack_shape == (5,)
  assert spec.keepdims_shape == (5, 1, 1, 1, 4)
  (spec,) = lx.layer_specs({'k': kernel}, stack_axes=1)
  assert spec.unit_shape == (5,)


def test_stacked_default_rule_applies_per_slice():
  params = {'blocks': {'kernel': jnp.ones((4, 8, 8)), 'bias': jnp.ones((4, 8))}}
  assert _paths(lx.layer_specs(params, stack_axes=1)) == ['blocks/kernel']


def test_per_neuron_on_a_vector_is_a_value_error_naming_the_leaf():
  with pytest.raises(ValueError, match="'bias'"):
    lx.layer_specs({'bias': jnp.ones(3)}, mask={'bias': True}, per_neuron=True)


def test_mask_with_wrong_structure_is_a_value_error():
  with pytest.raises(ValueError, match='mask'):
    lx.layer_specs({'a': jnp.ones((2, 2))}, mask={'b': True, 'c': False})


def test_paths_use_natural_order():
  names = ['Dense_10', 'Dense_2', 'Conv_0', 'Dense_1']
  assert sorted(names, key=_layers.natural_key) == ['Conv_0', 'Dense_1', 'Dense_2', 'Dense_10']


def test_layer_order_default_and_explicit():
  params = {f'Dense_{i}': {'kernel': jnp.ones((2, 2))} for i in (10, 2, 0)}
  specs = lx.layer_specs(params)
  natural = [specs[i].path for i in _layers.layer_order(specs)]
  assert natural == ['Dense_0/kernel', 'Dense_2/kernel', 'Dense_10/kernel']
  order = ['Dense_10/kernel', 'Dense_0/kernel', 'Dense_2/kernel']
  assert [specs[i].path for i in _layers.layer_order(specs, order)] == order
  with pytest.raises(ValueError, match='Dense_2/kernel'):
    _layers.layer_order(specs, order[:2])


def _paper_alpha(L, alpha):
  """The formula of the paper's Section 4, term by term."""
  out = []
  for l in range(L):
    if alpha > 0:
      out.append(((1 - alpha) ** (5 / (L - 1))) ** (L - 1 - l))
    else:
      out.append(((1 + alpha) ** (5 / (L - 1))) ** l)
  return out


@pytest.mark.parametrize('alpha', [-1.0, -0.6, -0.2, 0.0, 0.3, 0.9, 1.0])
def test_alpha_multipliers_follow_the_paper_in_forward_order(alpha):
  names = ['Conv_0', 'Conv_1', 'Conv_2', 'Dense_10', 'Dense_2']
  params = {n: {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)} for n in names}
  order = ['Conv_0/kernel', 'Conv_1/kernel', 'Conv_2/kernel', 'Dense_2/kernel',
           'Dense_10/kernel']
  m = lx.alpha_multipliers(params, alpha)  # natural sort is this order here
  got = [float(m[p.split('/')[0]]['kernel']) for p in order]
  np.testing.assert_allclose(got, _paper_alpha(5, alpha), rtol=1e-6)
  assert m['Conv_0']['bias'] is None
  reversed_m = lx.alpha_multipliers(params, alpha, order=order[::-1])
  got = [float(reversed_m[p.split('/')[0]]['kernel']) for p in order[::-1]]
  np.testing.assert_allclose(got, _paper_alpha(5, alpha), rtol=1e-6)


def test_alpha_counts_each_stacked_slice_as_a_layer():
  params = {'a_embed': {'kernel': jnp.ones((2, 2))},
            'b_blocks': {'kernel': jnp.ones((3, 2, 2))}}
  m = lx.alpha_multipliers(params, 0.5, stack_axes={'a_embed': 0, 'b_blocks': 1})
  got = [float(m['a_embed']['kernel'])] + list(np.asarray(m['b_blocks']['kernel']))
  np.testing.assert_allclose(got, _paper_alpha(4, 0.5), rtol=1e-6)


def test_alpha_out_of_range_is_a_value_error():
  with pytest.raises(ValueError, match='alpha'):
    lx.alpha_multipliers({'w': jnp.ones((2, 2))}, 1.5)


def test_alpha_multipliers_drive_layca_rates():
  rng = np.random.default_rng(0)
  params = {f'Dense_{i}': {'kernel': jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
            for i in range(3)}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  m = lx.alpha_multipliers(params, -0.5)
  tx = lx.layca_sgd(0.2, multipliers=m)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  angles = lx.step_rotation(params, new)
  for i in range(3):
    want = np.arctan(0.2 * float(m[f'Dense_{i}']['kernel']))
    np.testing.assert_allclose(float(angles[f'Dense_{i}']['kernel']), want, rtol=1e-4)
