"""Kernels of one update step: how many run, for how long, and what the call costs.

Each optimizer's step (``update`` + ``apply_updates``, params and state
donated) is compiled once and profiled with ``jax.profiler`` over
``--steps`` calls. From the trace, per step: the kernels that ran (trace
events named after an instruction of the compiled program: fusions, copies,
library calls) and their summed time; from the compiled program: its fusions,
conditionals and while loops (an XLA pass may turn a conditional into both
branches and a select; the kernels that ran tell, e.g. whether
``track_rotation(every=4)`` measures on one step in four); and the wall time
of a call when calls are issued back to back (host dispatch included, which
``bench_update.py``'s loop inside one ``jit`` leaves out).

    python benchmarks/profile_update.py --full    # ResNet-50 / GPT-2-small
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import _common as common
import bench_update
import layca_jax as lx

TRACKED = 'optax.sgd + lx.track_rotation(every=4)'
# bench_update's optimizers, and rotation tracking: its conditional (record
# or not) should be kept, so that only one step in four measures.
OPTIMIZERS = {**bench_update.OPTIMIZERS, TRACKED: (
    lambda: optax.chain(optax.sgd(0.1), lx.track_rotation(every=4)), None,
    None)}
NAMES = ['optax.sgd', 'floor: two-pass closed form', 'lx.layca_sgd',
         'lx.layca_sgd (ablation: no switch)',
         'lx.layca_sgd (ablation: lax.cond switch)', TRACKED]
COLUMNS = ['model', 'optimizer', 'wall_ms', 'kernel_ms', 'kernels',
           'fusions', 'conditionals', 'whiles', 'skipped']


def compiled_step(name: str, params, grads):
  """(compiled step, its args): ``name``'s step of ``bench_update``,
  params and state donated, traced under the row's library patch."""
  make, _, _, *patch = OPTIMIZERS[name]
  tx = make()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: bench_update.apply_step(tx, p, s, g),
                 donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)  # The step donates them.
  with patch[0](params) if patch else contextlib.nullcontext():
    return step.lower(params, state, grads).compile(), (params, state, grads)


def program_counts(hlo: str) -> dict[str, Any]:
  """Instruction names of a compiled program's text, and its counts of
  fusions, conditionals and while loops."""
  ops = collections.Counter(re.findall(
      r'^\s*(?:ROOT )?%\S+ = .*?\s([a-z][a-z0-9-]*)\(', hlo, re.MULTILINE))
  return {'names': {kernel_name(name)
                    for name in re.findall(r'%([\w.-]+) = ', hlo)},
          'fusions': ops['fusion'], 'conditionals': ops['conditional'],
          'whiles': ops['while']}


def kernel_name(name: str) -> str:
  """An instruction's or a trace event's name as both spell it (XLA:GPU
  names a fusion's kernel ``loop_add_fusion_3`` after ``%loop_add_fusion.3``)."""
  return name.replace('.', '_').replace('-', '_')


def trace_kernels(run, steps: int, names: set[str]) -> tuple[float, float]:
  """(kernel ms, kernels) per step: trace events named after an instruction
  of the program (``names``), over ``steps`` calls of ``run``."""
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      run(steps)
    path, = glob.glob(f'{folder}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  kernels = [e for e in events
             if e.get('ph') == 'X' and kernel_name(e['name']) in names]
  return (sum(e.get('dur', 0) for e in kernels) / steps / 1e3,
          len(kernels) / steps)


def profile(model: str, name: str, params, grads, steps: int) -> dict:
  compiled, (p, s, g) = compiled_step(name, params, grads)
  counts = program_counts(compiled.as_text())
  carry = [p, s]

  def run(n: int) -> None:
    for _ in range(n):
      carry[:] = compiled(*carry, g)
    jax.block_until_ready(carry)

  run(3)
  start = time.perf_counter()
  run(steps)
  wall = (time.perf_counter() - start) / steps * 1e3
  kernel_ms, kernels = trace_kernels(run, steps, counts.pop('names'))
  return {'model': model, 'optimizer': name, 'wall_ms': wall,
          'kernel_ms': kernel_ms, 'kernels': kernels, **counts}


def main() -> None:
  parser = common.shapes_parser(__doc__.splitlines()[0])
  parser.add_argument('--only', nargs='+', default=NAMES,
                      choices=list(OPTIMIZERS))
  args = parser.parse_args()
  divisor, steps, _ = common.run_size(args)
  info = common.device_info()
  print(f'{info["device"]} ({info["platform"]}), width/{divisor}, '
        f'{steps} calls profiled', flush=True)
  rows = []
  for model in args.models:
    params, grads = bench_update.random_inputs(common.MODELS[model](divisor))
    for name in args.only:
      try:
        rows.append(profile(model, name, params, grads, steps))
      except bench_update.AblationUnavailable as e:
        rows.append({'model': model, 'optimizer': name, 'skipped': str(e)})
      print(f'  {model} {name}: {rows[-1]}', flush=True)
  common.report('profile_update', rows, COLUMNS, 'Kernels per update step',
                args, info, width_divisor=divisor, steps=steps)


if __name__ == '__main__':
  main()
