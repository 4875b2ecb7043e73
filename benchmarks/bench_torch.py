"""Layca-SGD in PyTorch (a per-tensor loop and a ``torch._foreach`` version) vs lx.layca_sgd.

Both PyTorch versions are written here (PyTorch has no Layca): per layer
(``ndim >= 2``) they project the gradient on the tangent space, rescale it to
the layer's norm, step by ``rate`` and return to the initial norm; other
tensors are frozen, as in ``lx.layca_sgd``. They are timed per call, host
launch included (``torch.cuda.synchronize`` after each call on GPU). The same
shapes go through ``lx.layca_sgd`` and ``optax.sgd`` device-side (many steps in
one ``jit``, as in ``bench_update.py``), in the same run. Skipped cleanly when
PyTorch is not installed.

    python benchmarks/bench_torch.py            # scaled-down shapes on CPU
    python benchmarks/bench_torch.py --full
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import jax
import optax

import _common as common
import layca_jax as lx
from bench_update import update_loop

RATE = 3.0 ** -3

try:
  import torch
except ImportError:  # pragma: no cover - depends on the environment.
  torch = None


def layca_per_tensor(params, grads, norms0, rate):
  """One Layca-SGD step, one tensor at a time (in place)."""
  with torch.no_grad():
    for w, g, n0 in zip(params, grads, norms0):
      if n0 is None:
        continue
      ww = torch.sum(w * w)
      t = g - (torch.sum(g * w) / ww) * w
      tn = torch.linalg.vector_norm(t)
      scale = torch.where(tn > 0, torch.sqrt(ww) / tn, torch.zeros_like(tn))
      w.sub_(t * (rate * scale))
      w.mul_(n0 / torch.linalg.vector_norm(w))


def layca_foreach(params, grads, norms0, rate):
  """One Layca-SGD step with ``torch._foreach`` ops over all layers (in place)."""
  with torch.no_grad():
    layers = [i for i, n in enumerate(norms0) if n is not None]
    ws = [params[i] for i in layers]
    gs = [grads[i] for i in layers]
    n0 = torch.stack([norms0[i] for i in layers])
    wn = torch.stack(torch._foreach_norm(ws))
    gw = torch.stack([p.sum() for p in torch._foreach_mul(gs, ws)])
    c = gw / (wn * wn)
    ts = torch._foreach_sub(gs, torch._foreach_mul(ws, list(c.unbind())))
    tn = torch.stack(torch._foreach_norm(ts))
    scale = torch.where(tn > 0, rate * wn / tn, torch.zeros_like(tn))
    torch._foreach_mul_(ts, list(scale.unbind()))
    torch._foreach_sub_(ws, ts)
    new_norm = torch.stack(torch._foreach_norm(ws))
    torch._foreach_mul_(ws, list((n0 / new_norm).unbind()))


def sgd_foreach(params, grads, rate):
  with torch.no_grad():
    torch._foreach_add_(params, grads, alpha=-rate)


def time_torch(fn, repeats: int, calls: int, device) -> dict[str, float]:
  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  fn(); sync()
  times = []
  for _ in range(repeats):
    sync()
    start = time.perf_counter()
    for _ in range(calls):
      fn()
    sync()
    times.append((time.perf_counter() - start) / calls)
  return {'ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times)}


def main() -> None:
  args = common.shapes_parser(__doc__.splitlines()[0]).parse_args()
  info = common.device_info()
  if torch is None:
    print('PyTorch is not installed: skipping bench_torch.')
    common.write_json(args.json or common.default_json_path('bench_torch'),
                      {'benchmark': 'bench_torch', 'info': info,
                       'skipped': 'torch not installed', 'rows': []})
    return
  divisor, steps, repeats = common.run_size(args)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  info['torch'] = torch.__version__
  info['torch_device'] = (torch.cuda.get_device_name() if device.type == 'cuda'
                          else 'cpu')
  rows = []
  for model in args.models:
    shapes = common.MODELS[model](divisor)
    params = common.random_tree(shapes, seed=0, scale=0.05)
    grads = common.random_tree(shapes, seed=1, scale=1e-3)
    # PyTorch first, per call: XLA:CPU's worker threads keep spinning for a
    # while after JAX work and would slow PyTorch's threads down.
    to_torch = lambda tree: [torch.tensor(np.asarray(x), device=device)
                             for x in jax.tree.leaves(tree)]
    tw, tg = to_torch(params), to_torch(grads)
    norms0 = [torch.linalg.vector_norm(w) if w.ndim >= 2 else None for w in tw]
    calls = max(1, steps // 5)
    torch_rows = {
        'torch SGD (_foreach_add_)': time_torch(
            lambda: sgd_foreach(tw, tg, 0.1), repeats, calls, device),
        'torch Layca per-tensor loop': time_torch(
            lambda: layca_per_tensor(tw, tg, norms0, RATE), repeats, calls, device),
        'torch Layca _foreach': time_torch(
            lambda: layca_foreach(tw, tg, norms0, RATE), repeats, calls, device),
    }
    # JAX, device-side.
    fns = {}
    for name, tx in (('optax.sgd (jax)', optax.sgd(0.1)),
                     ('lx.layca_sgd (jax)', lx.layca_sgd(RATE))):
      run, state = update_loop(tx, steps), tx.init(params)
      fns[name] = (lambda run=run, state=state: run(params, state, grads))
    jax_times = common.time_interleaved(fns, repeats)
    layca_ms = common.per_step(jax_times['lx.layca_sgd (jax)'], steps)['ms']
    for name in fns:
      rows.append({'model': model, 'implementation': name,
                   **common.per_step(jax_times[name], steps)})
    for name, t in torch_rows.items():
      rows.append({'model': model, 'implementation': name, **t})
    for r in rows:
      if r['model'] == model:
        r['vs_lx_layca_sgd'] = r['ms'] / layca_ms
        r.update(params=common.tree_size(params), width_divisor=divisor)
    for r in rows[-5:]:
      print(f'  {model:10s} {r["implementation"]:30s} {r["ms"]:.4f} ms', flush=True)
  common.report('bench_torch', rows,
                ['model', 'implementation', 'ms', 'min_ms', 'vs_lx_layca_sgd'],
                'Layca-SGD step, JAX vs PyTorch', args, info, steps=steps,
                repeats=repeats)


if __name__ == '__main__':
  main()
