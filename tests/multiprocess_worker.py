"""One process of the 2-process Layca run of ``tests/test_multiprocess.py``.

``python multiprocess_worker.py PROCESS_ID PORT OUT_PATH`` joins a
2-process jax runtime on ``127.0.0.1:PORT`` (CPU collectives over gloo), one
CPU device per process. The params are sharded across the two processes
(kernels split on their first axis, FSDP-style), trained for a few steps of
``lx.layca_sgd(momentum=0.9)`` and ``lx.layca_adam`` inside one ``jit``, and
process 0 writes the gathered results (and layer rotations) to ``OUT_PATH``
as ``.npz``. ``run_single`` computes the same thing in one process.
"""

from __future__ import annotations

import os
import sys

import numpy as np

STEPS = 4


def make_problem() -> tuple[dict, list[dict]]:
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {
      'Dense_0': {'kernel': normal(8, 6), 'bias': normal(6) * 0.1},
      'Dense_1': {'kernel': normal(6, 4), 'bias': normal(4) * 0.1},
  }
  grads = [{k: {n: normal(*v.shape) for n, v in layer.items()}
            for k, layer in params.items()} for _ in range(STEPS)]
  return params, grads


def optimizers():
  import layca_jax as lx
  return {'layca_sgd': lx.layca_sgd(0.1, momentum=0.9),
          'layca_adam': lx.layca_adam(0.02)}


def train(tx, params, grads_seq):
  """init and STEPS updates; returns (params, layer rotation since init)."""
  import jax
  import optax
  import layca_jax as lx

  @jax.jit
  def run(params, grads_seq):
    state = tx.init(params)
    p = params
    for grads in grads_seq:
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, lx.layer_rotation(p, params)

  return run(params, grads_seq)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
  import jax
  from layca_jax._layers import leaf_paths
  return {f'{prefix}/{path}': np.asarray(leaf) for path, leaf in
          zip(leaf_paths(tree), jax.tree.leaves(tree))}


def run_single() -> dict[str, np.ndarray]:
  params, grads = make_problem()
  out = {}
  for name, tx in optimizers().items():
    p, rotation = train(tx, params, grads)
    out.update(flat(p, f'{name}/params'))
    out.update(flat(rotation, f'{name}/rotation'))
  return out


def run_distributed(process_id: int, port: int, out_path: str) -> None:
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id,
                             initialization_timeout=60)
  try:
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ('x',),
                         axis_types=(jax.sharding.AxisType.Auto,))

    def place(tree):
      def one(x):
        spec = P('x', None) if x.ndim == 2 else P()
        return jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, spec), lambda index: x[index])
      return jax.tree.map(one, tree)

    params, grads = make_problem()
    params, grads = place(params), [place(g) for g in grads]
    kernel = params['Dense_0']['kernel']
    assert not kernel.is_fully_addressable
    assert len(kernel.addressable_shards) == 1
    out = {}
    for name, tx in optimizers().items():
      p, rotation = train(tx, params, grads)
      gathered = multihost_utils.process_allgather((p, rotation), tiled=True)
      out.update(flat(gathered[0], f'{name}/params'))
      out.update(flat(gathered[1], f'{name}/rotation'))
    if process_id == 0:
      np.savez(out_path, **out)
  finally:
    jax.distributed.shutdown()


if __name__ == '__main__':
  os.environ['JAX_PLATFORMS'] = 'cpu'
  run_distributed(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
