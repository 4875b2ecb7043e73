"""Sharding checks on 8 virtual CPU devices; run by ``tests/test_sharding.py``.

Run directly as ``python tests/sharding_checks.py [check names]``: sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax,
runs the named checks (all by default) and prints one JSON line
``{"check_name": "ok" | "<traceback>"}``. Every check compares a sharded run
with the same run on one device, to 1e-5 relative (per leaf: the largest
absolute difference over the largest magnitude of the reference).
"""

from __future__ import annotations

import os
import sys

# Low LLVM optimisation: these checks are compile-bound (numerics unchanged).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8'
                           + ' --xla_backend_optimization_level=0'
                           + ' --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import layca_jax as lx  # noqa: E402
from layca_jax._layers import leaf_paths  # noqa: E402

RTOL = 1e-5
STEPS = 3
HAS_TRACKING = hasattr(lx, 'track_rotation')


# ---------------------------------------------------------------------------
# Data.


def make_params(seed: int = 0, odd: bool = False) -> dict:
  """A small MLP; every kernel dimension divides by 8 unless ``odd``."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {
      'Dense_0': {'kernel': normal(16, 32), 'bias': normal(32) * 0.1},
      'LayerNorm_0': {'scale': 1 + 0.1 * normal(32)},
      'Dense_1': {'kernel': normal(32, 8)},
  }
  if odd:  # 12 and 10 do not divide by 8: XLA pads the shards.
    params['Odd_0'] = {'kernel': normal(12, 10), 'bias': normal(10) * 0.1}
  return params


def make_grads(params: dict, seed: int = 1) -> dict:
  """STEPS gradients per leaf, stacked on a leading axis."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: rng.normal(size=(STEPS,) + p.shape).astype(np.float32), params)


# ---------------------------------------------------------------------------
# Comparison.


def assert_close(actual: Any, expected: Any, what: str) -> None:
  """Same structure; every leaf within RTOL of the reference's magnitude."""
  a_flat, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_flat, e_def = jax.tree_util.tree_flatten_with_path(expected)
  assert a_def == e_def, f'{what}: structures differ: {a_def} vs {e_def}'
  for (path, a), (_, e) in zip(a_flat, e_flat):
    a = np.asarray(jax.device_get(a), np.float64)
    e = np.asarray(jax.device_get(e), np.float64)
    name = f'{what} at {jax.tree_util.keystr(path)}'
    assert a.shape == e.shape, f'{name}: shape {a.shape} vs {e.shape}'
    assert np.all(np.isfinite(a)) == np.all(np.isfinite(e)), name
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(a - e), initial=0.0))
    assert err <= RTOL * scale, (
        f'{name}: max abs difference {err:.3g} > {RTOL} * {scale:.3g}')


def is_kernel(path: str, shape: tuple) -> bool:
  return path.endswith('kernel') and len(shape) == 2


# ---------------------------------------------------------------------------
# The transforms under test, as factories of ``axis_name`` (for shard_map).

TRANSFORMS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'layca_chain': lambda **kw: optax.chain(
        lx.layca(**kw), optax.sgd(0.1), lx.keep_norm(**kw)),
    'adam_keep_norm': lambda **kw: optax.chain(
        optax.adam(0.05), lx.keep_norm(**kw)),
    'layca_sgd_momentum': lambda **kw: lx.layca_sgd(0.1, momentum=0.9, **kw),
    'layca_sgd_nesterov_per_neuron': lambda **kw: lx.layca_sgd(
        0.1, momentum=0.9, nesterov=True, per_neuron=True, **kw),
    'layca_adam': lambda **kw: lx.layca_adam(0.02, **kw),
    'layca_rmsprop': lambda **kw: lx.layca_rmsprop(0.02, **kw),
    'layca_adagrad': lambda **kw: lx.layca_adagrad(
        0.02, non_layer_learning_rate=0.01, **kw),
}
if HAS_TRACKING:
  TRANSFORMS['track_rotation'] = lambda **kw: optax.chain(
      lx.layca_sgd(0.1, momentum=0.9, **kw), lx.track_rotation(**kw))


def apply_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def moved_params(params, grads_seq):
  """Params one plain gradient step away, for the rotation measurements."""
  return jax.tree.map(lambda p, g: p - 0.3 * g[0], params, grads_seq)


# The transforms whose code differs in how it reduces; the rest differ only
# in elementwise base directions. Used where a layout repeats a covered case.
CORE = ('layca_chain', 'layca_adam', 'layca_sgd_nesterov_per_neuron',
        'rotations/per_neuron=False')


def train_all(params, grads_seq, constrain=lambda t: t, names=None,
              **options):
  """Every transform (or those in ``names``): init, then a ``lax.scan``
  over the stacked grads; and both rotation measurements (whole layers and
  per neuron). Traced once, so a layout costs one compilation."""
  out = {}
  for name, make in TRANSFORMS.items():
    if names is not None and name not in names:
      continue
    tx = make(**options)

    def step(carry, grads, tx=tx):
      return apply_step(tx)(*carry, constrain(grads)), None

    params_c = constrain(params)
    (p, s), _ = jax.lax.scan(step, (params_c, tx.init(params_c)), grads_seq)
    out[name] = {'params': p, 'state': s}
  moved = constrain(moved_params(params, grads_seq))
  for per_neuron in (False, True):
    if names is not None and f'rotations/per_neuron={per_neuron}' not in names:
      continue
    out[f'rotations/per_neuron={per_neuron}'] = {
        fn.__name__: fn(moved, constrain(params), per_neuron=per_neuron,
                        **options)
        for fn in (lx.layer_rotation, lx.step_rotation)}
  return out


def single_device(tree):
  return jax.device_put(tree, jax.devices()[0])


_REFERENCES: dict[bool, dict] = {}


def reference_runs(params, grads_seq) -> dict:
  """Everything on one device (cached per parameter set)."""
  key = 'Odd_0' in params
  if key not in _REFERENCES:
    _REFERENCES[key] = jax.device_get(jax.jit(train_all)(
        single_device(params), single_device(grads_seq)))
  return _REFERENCES[key]


def assert_all_close(got: dict, expected: dict, label: str,
                     names=None) -> None:
  for name in names or expected:
    if name not in expected:  # track_rotation before it lands.
      continue
    assert_close(got[name], expected[name], f'{label}/{name}')


# ---------------------------------------------------------------------------
# jit + NamedSharding layouts.


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def layout_specs(params: dict, layout: str) -> dict:
  """PartitionSpec per leaf: 'dp' replicated, 'fsdp' kernels split on their
  first axis, 'tp' on their output axis (1-d leaves too), '2d' both."""

  def spec(path, leaf):
    kernel = is_kernel(path_str(path), np.shape(leaf))
    if layout == 'dp':
      return P()
    if layout == 'fsdp':
      return P('x', None) if kernel else P()
    if layout == 'tp':
      return P(None, 'x') if kernel else P('x')
    if layout == '2d':
      return P('data', 'model') if kernel else P('model')
    raise ValueError(layout)

  return jax.tree_util.tree_map_with_path(spec, params)


def mesh_for(layout: str, axis_type=AxisType.Auto):
  if layout == '2d':
    return jax.make_mesh((4, 2), ('data', 'model'), axis_types=(axis_type,) * 2)
  return jax.make_mesh((8,), ('x',), axis_types=(axis_type,))


def check_layouts_placed(layout: str, axis_type=AxisType.Auto,
                         names=None) -> None:
  """Params and grads placed with NamedSharding; jit propagates the rest."""
  params = make_params()
  grads_seq = make_grads(params)
  expected = reference_runs(params, grads_seq)
  mesh = mesh_for(layout, axis_type)
  specs = layout_specs(params, layout)
  is_spec = lambda x: isinstance(x, P)
  placed = jax.device_put(params, jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec))
  placed_grads = jax.device_put(grads_seq, jax.tree.map(
      lambda s: NamedSharding(mesh, P(None, *s)), specs, is_leaf=is_spec))
  got = jax.jit(lambda p, g: train_all(p, g, names=names))(placed,
                                                            placed_grads)
  assert_all_close(got, expected, layout, names)
  for name in names or TRANSFORMS:
    if name not in TRANSFORMS:
      continue
    for path, leaf in zip(leaf_paths(params),
                          jax.tree.leaves(got[name]['params'])):
      assert len(leaf.sharding.device_set) == 8, (
          f'{layout}/{name}: {path} left the mesh: {leaf.sharding}')


def check_dp() -> None:
  check_layouts_placed('dp', names=CORE)


def check_fsdp() -> None:
  check_layouts_placed('fsdp')


def check_tp() -> None:
  check_layouts_placed('tp', names=CORE)


def check_fsdp_tp_2d() -> None:
  check_layouts_placed('2d', names=CORE)


def check_fsdp_explicit_axes() -> None:
  """jax.make_mesh's default axis type is Explicit in jax 0.10."""
  check_layouts_placed('fsdp', AxisType.Explicit, names=CORE)


def check_uneven() -> None:
  """A layer whose sizes do not divide by the mesh.

  jax refuses an uneven NamedSharding for a placed array (device_put,
  out_shardings); inside jit ``with_sharding_constraint`` asks XLA to split
  it anyway (it pads the shards). Layca must give the unsharded answer.
  """
  params = make_params(odd=True)
  grads_seq = make_grads(params)
  mesh = mesh_for('fsdp')
  try:
    jax.device_put(params['Odd_0']['kernel'], NamedSharding(mesh, P('x')))
  except Exception as e:  # jax's IndivisibleError (not exported).
    assert 'evenly divide' in str(e), e
  else:
    raise AssertionError('device_put accepted an uneven sharding')

  def constrain(tree):
    # Kernels alternate between the first and the output axis.
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([
        jax.lax.with_sharding_constraint(x, NamedSharding(
            mesh, P() if x.ndim < 2 else
            P(*([None] * (x.ndim - 2)), *(('x', None) if i % 2 else (None, 'x')))))
        for i, x in enumerate(leaves)])

  expected = reference_runs(params, grads_seq)
  got = jax.jit(lambda p, g: train_all(p, g, constrain, CORE))(params,
                                                               grads_seq)
  assert_all_close(got, expected, 'uneven', CORE)


# ---------------------------------------------------------------------------
# shard_map and pmap with axis_name.


def unit_spec(leaf_shape, param_shape, spec: P) -> P:
  """Spec of a state leaf derived from its param's spec.

  Param-shaped leaves (momentum, Adam moments, tracked init params) take the
  param's spec; per-unit leaves (norms, counts, rotations) keep the spec of
  the param's output axis when they have one (per-neuron units), else ().
  """
  spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  if tuple(leaf_shape) == tuple(param_shape):
    return P(*spec)
  if len(leaf_shape) == 1 and leaf_shape[0] == param_shape[-1]:
    return P(spec[-1])
  return P()


def specs_like(tree, params, param_specs) -> Any:
  """PartitionSpecs for a pytree (optimizer state, rotations) whose leaves
  sit at paths ending in param paths; other leaves replicated."""
  by_path = {path: (np.shape(p), s) for path, p, s in zip(
      leaf_paths(params), jax.tree.leaves(params),
      jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P)))}

  def spec(path, leaf):
    name = path_str(path)
    for p, (shape, s) in by_path.items():
      if name == p or name.endswith('/' + p):
        return unit_spec(np.shape(leaf), shape, s)
    return P()

  return jax.tree_util.tree_map_with_path(spec, tree)


def shard_map_train_all(params, grads_seq, mesh, pspecs, axis_name,
                        names=None):
  """train_all inside one shard_map; out_specs derived from the unsharded
  shapes."""
  body = lambda p, g: train_all(p, g, names=names, axis_name=axis_name)
  shapes = jax.eval_shape(lambda p, g: train_all(p, g, names=names), params,
                          grads_seq)
  gspecs = jax.tree.map(lambda s: P(None, *s), pspecs,
                        is_leaf=lambda x: isinstance(x, P))
  f = jax.shard_map(body, mesh=mesh, in_specs=(pspecs, gspecs),
                    out_specs=specs_like(shapes, params, pspecs))
  return jax.jit(f)(params, grads_seq)


def fsdp_specs(params, replicated=()):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: P('x', None) if is_kernel(path_str(path), np.shape(x))
      and path_str(path) not in replicated else P(), params)


def check_shard_map_one_axis_name() -> None:
  """Every layer leaf split on its first axis (a reduced axis, also for
  per-neuron units); one name for all leaves (non-layer leaves are
  replicated and ignore it)."""
  params = make_params()
  grads_seq = make_grads(params)
  got = shard_map_train_all(params, grads_seq, mesh_for('fsdp'),
                            fsdp_specs(params), 'x')
  assert_all_close(got, reference_runs(params, grads_seq), 'shard_map(fsdp)')


def check_shard_map_per_leaf_axis_name() -> None:
  """One kernel replicated (axis_name None) beside split ones."""
  params = make_params()
  grads_seq = make_grads(params)
  pspecs = fsdp_specs(params, ('Dense_1/kernel',))
  axis_names = jax.tree.map(lambda s: 'x' if s == P('x', None) else None,
                            pspecs, is_leaf=lambda x: isinstance(x, P))
  names = ('layca_sgd_momentum', 'adam_keep_norm', 'track_rotation',
           'rotations/per_neuron=False')
  got = shard_map_train_all(params, grads_seq, mesh_for('fsdp'), pspecs,
                            axis_names, names)
  assert_all_close(got, reference_runs(params, grads_seq), 'shard_map(per-leaf)',
                   names)


def check_shard_map_tensor_parallel() -> None:
  """Kernels split on their output axis: whole-layer units need the psum
  (axis_name 'x'); per-neuron units are whole on each device (None)."""
  params = make_params()
  grads_seq = make_grads(params)
  expected = reference_runs(params, grads_seq)
  mesh = mesh_for('fsdp')
  tp = jax.tree_util.tree_map_with_path(
      lambda path, x: P(None, 'x') if is_kernel(path_str(path), np.shape(x))
      else P(), params)
  whole = ['layca_sgd_momentum', 'rotations/per_neuron=False']
  got = shard_map_train_all(params, grads_seq, mesh, tp, 'x', whole)
  assert_all_close(got, expected, 'shard_map(tp, whole layers)', whole)
  neurons = ['layca_sgd_nesterov_per_neuron', 'rotations/per_neuron=True']
  got = shard_map_train_all(params, grads_seq, mesh, tp, None, neurons)
  assert_all_close(got, expected, 'shard_map(tp, per neuron)', neurons)


def check_shard_map_double_counting() -> None:
  """What naming the axis for a replicated kernel does: its sums cover its
  8 identical copies. Every result of Layca is a ratio of such sums (the
  step, keep_norm's factor, the cosine distance), so they stay right; the
  norms stored in the state come out sqrt(8) times too large. Per-leaf
  ``None`` gives the true norms."""
  params = make_params()
  grads_seq = make_grads(params)
  mesh = mesh_for('fsdp')
  pspecs = fsdp_specs(params, ('Dense_1/kernel',))
  names = ['layca_chain', 'rotations/per_neuron=False']
  got = shard_map_train_all(params, grads_seq, mesh, pspecs, 'x', names)
  expected = reference_runs(params, grads_seq)
  assert_close(got['layca_chain']['params'], expected['layca_chain']['params'],
               'double counting/params')
  assert_close(got[names[1]], expected[names[1]], 'double counting/rotations')
  norms = lambda out: out['layca_chain']['state'][0].initial_norm
  np.testing.assert_allclose(norms(got)['Dense_1']['kernel'],
                             np.sqrt(8) * norms(expected)['Dense_1']['kernel'],
                             rtol=1e-5)
  np.testing.assert_allclose(norms(got)['Dense_0']['kernel'],
                             norms(expected)['Dense_0']['kernel'], rtol=1e-5)


def check_init_outside_mapping() -> None:
  """``init`` with an ``axis_name`` must run under the same mapping: outside
  it jax raises NameError (unbound axis). The state built inside equals the
  state of the same transform without axis_name on the global params, so
  that state may be built outside and passed in."""
  params = make_params()
  make = TRANSFORMS['layca_sgd_momentum']
  try:
    make(axis_name='x').init(params)
  except NameError as e:
    assert 'unbound axis name' in str(e), e
  else:
    raise AssertionError('init outside shard_map accepted axis_name')
  pspecs = fsdp_specs(params)
  outside = make().init(params)
  inside = jax.jit(jax.shard_map(
      make(axis_name='x').init, mesh=mesh_for('fsdp'), in_specs=(pspecs,),
      out_specs=specs_like(outside, params, pspecs)))(params)
  assert_close(inside, outside, 'init inside vs outside shard_map')


def check_pmap() -> None:
  """pmap over the kernels' first axis (each device holds 2 rows of every
  kernel; 1-d leaves replicated), ``axis_name`` per leaf."""
  params = make_params()
  grads_seq = make_grads(params)
  n = jax.device_count()
  split = lambda x, lead=0: (
      np.moveaxis(x.reshape(x.shape[:lead] + (n, -1) + x.shape[lead + 1:]),
                  lead, 0) if x.ndim - lead == 2
      else np.broadcast_to(x, (n,) + x.shape))
  axis_names = jax.tree.map(lambda x: 'x' if x.ndim == 2 else None, params)
  names = ['layca_sgd_momentum', 'layca_chain', 'rotations/per_neuron=False']
  body = lambda p, g: train_all(p, g, names=names, axis_name=axis_names)
  got = jax.pmap(body, axis_name='x')(
      jax.tree.map(split, params),
      jax.tree.map(lambda g: split(g, 1), grads_seq))
  unsplit = lambda x, p: (np.asarray(x).reshape(p.shape) if p.ndim == 2
                          else np.asarray(x)[0])
  expected = reference_runs(params, grads_seq)
  for name in names[:2]:
    assert_close(jax.tree.map(unsplit, got[name]['params'], params),
                 expected[name]['params'], f'pmap/{name}')
  assert_close(jax.tree.map(lambda x: x[0], got[names[2]]), expected[names[2]],
               'pmap/rotations')


def traced_as_on(platform: str) -> None:
  """The update traced for ``platform``'s compiler, with jit and FSDP
  shardings and inside shard_map, matches the one-device run traced as on
  CPU (one switch, the barrier, the sums read raw)."""
  from layca_jax import _closed_form
  params = make_params()
  grads_seq = make_grads(params)
  expected = reference_runs(params, grads_seq)
  compiling_for = _closed_form.compiling_for
  _closed_form.compiling_for = lambda: platform
  try:
    check_layouts_placed('fsdp', names=CORE)
    got = shard_map_train_all(params, grads_seq, mesh_for('fsdp'),
                              fsdp_specs(params), 'x', CORE)
    assert_all_close(got, expected,
                     f'shard_map(fsdp), traced as on {platform}', CORE)
  finally:
    _closed_form.compiling_for = compiling_for


def check_traced_as_on_tpu() -> None:
  """One switch per layer leaf, no barrier on the base's direction
  (``_closed_form.leaves_stay_on_chip``)."""
  traced_as_on('tpu')


def check_traced_as_on_gpu() -> None:
  """The branches after the fast one behind loops of at most one trip, in
  custom_jvps (``_closed_form.conditionals_run_both_branches``)."""
  traced_as_on('gpu')


CHECKS = {name[len('check_'):]: fn for name, fn in sorted(globals().items())
          if name.startswith('check_') and callable(fn)
          and name != 'check_layouts_placed'}


def main(names: list[str]) -> dict[str, str]:
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for name in names or CHECKS:
    try:
      CHECKS[name]()
      results[name] = 'ok'
    except Exception:  # Reported to the pytest side, one entry per check.
      results[name] = traceback.format_exc()
  return results


if __name__ == '__main__':
  print(json.dumps({'tracking': HAS_TRACKING, 'results': main(sys.argv[1:])}))
