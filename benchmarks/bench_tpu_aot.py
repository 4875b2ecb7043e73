"""XLA:TPU's own count of one optimizer update's memory traffic, compiled without a TPU.

Every optimizer of ``bench_update.py`` (plus a plain two-pass closed form of
Layca-SGD written here, and ``lx.track_rotation`` chained after
``optax.sgd``) is compiled ahead of time for a TPU topology (default
``v5e:2x2``, one chip used) from ``jax[tpu]``'s ``libtpu``, with no TPU
attached: nothing runs on a TPU. The step is ``params, state, grads ->
apply_updates(params, tx.update(grads, state, params))`` with params and
state donated. Reported per row, from the compiled program:

* ``bytes accessed`` of XLA's cost analysis (``_MB``; ``_x_params``: over
  the bytes of the params), the number of fusions (``fusion`` instructions
  outside fusion bodies: the entry computation, and both branches of a
  conditional where there is one) and of copies (``copy-start`` / ``copy``:
  the moves between HBM and on-chip memory that XLA:TPU adds, which its
  count of bytes includes);
* for the whole program, and for the path taken at a well-conditioned state:
  the step is first run on the host with the benchmark's inputs, recording
  which branch each ``lax.cond`` / ``lax.switch`` took, then traced again
  with each of those calls replaced by the branch it took
  (``_common.taken_branches``). XLA counts a ``lax.cond`` as its most
  expensive branch plus its operands again (the ``toy`` record of the JSON),
  so the whole program's bytes are an upper bound, not the cost of a step;
* ratios to ``optax.sgd`` and to the matching optax base, and the bytes
  above the base in reads of the params (``extra_x_params``);
* for the path taken, the bytes that cross HBM (``hbm_``, :func:`hbm_traffic`:
  read from where XLA:TPU placed each array). XLA's ``bytes accessed``
  counts an array staged through on-chip memory (VMEM) three times, so it
  penalises exactly the on-chip reuse that saves HBM traffic: ``optax.sgd``
  counts 3.0 params-bytes of HBM traffic (its three passes) and ~9 of
  ``bytes accessed``. HBM bandwidth is what bounds an update's time.

Inputs are the random params and gradients of ``bench_update.py``
(well-conditioned: every Layca unit takes the fast branch). The
``track_rotation`` rows advance the chain by ``--every`` (or one more)
steps first, so that the measured step records (or does not).

Needs the opt-in extra: ``pip install -e '.[tpu]'`` (``libtpu``).

    python benchmarks/bench_tpu_aot.py                  # GPT-2-small
    python benchmarks/bench_tpu_aot.py --models gpt2_small resnet50
"""

from __future__ import annotations

import os

# Read by libtpu when the topology is made: without them it looks for TPU
# workers and logs errors. The step's recording run uses the host CPU.
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile-only: no TPU is opened, so other processes may load libtpu too.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import argparse
import contextlib
import importlib.metadata
import importlib.util
import collections
import itertools
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import _common as common
import bench_update
import layca_jax as lx
from layca_jax import _closed_form

SGD = 'optax.sgd'


def libtpu_missing() -> str | None:
  """Why the TPU compiler cannot be loaded, or None when it can."""
  if importlib.util.find_spec('libtpu') or os.environ.get('TPU_LIBRARY_PATH'):
    return None
  return ("libtpu is not installed: the deviceless TPU compile needs the "
          "opt-in extra, `pip install -e '.[tpu]'` (jax[tpu] at the "
          "installed jax version).")


# ---------------------------------------------------------------------------
# The path taken.


def primitive_names(jaxpr) -> set[str]:
  """Names of the primitives of ``jaxpr`` and of its sub-jaxprs."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          names |= primitive_names(sub)
  return names


# ---------------------------------------------------------------------------
# Compiling and reading the compiled program.


def tpu_sharding(topology: str) -> jax.sharding.Sharding:
  """A single-device sharding on the first chip of a compile-only topology."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology, 'tpu')
  return jax.sharding.SingleDeviceSharding(topo.devices[0])


def abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                     sharding=sharding), tree)


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$')
# An instruction's opcode is the first ` word(` after the `=`: shapes hold
# no space before a parenthesis (`f32[8]{0:T(256)}`, `(f32[2], s32[])`).
_INSTRUCTION = re.compile(  # Groups: name, shape, opcode, the rest.
    r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$')
_CALLS = re.compile(r'calls=%([\w.\-]+)')


Instruction = tuple[str, str, str, str]  # _INSTRUCTION's groups.


def computations(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
  """The instructions of each computation of an HLO module's text, and the
  name of its entry computation."""
  out: dict[str, list[Instruction]] = {}
  current: list[Instruction] = []
  entry = ''
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = out.setdefault(header.group(1), [])
      if line.startswith('ENTRY'):
        entry = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      current.append(instruction.groups())
  return out, entry


def count_ops(hlo: str) -> collections.Counter:
  """Opcodes of an HLO module's text, outside fusion bodies (the entry
  computation, and both branches of a conditional where there is one)."""
  parsed, _ = computations(hlo)
  bodies = {body for instructions in parsed.values()
            for _, _, opcode, rest in instructions if opcode == 'fusion'
            for body in _CALLS.findall(rest)}
  return sum((collections.Counter(opcode for _, _, opcode, _ in instructions)
              for name, instructions in parsed.items() if name not in bodies),
             collections.Counter())


_ARRAY = re.compile(r'\b(pred|[a-z]+\d+)\[([\d,]*)\](\{[^}]*\})?')
_NO_TRAFFIC = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
               'slice-done', 'copy-done', 'after-all'}


def _arrays(shape: str) -> list[tuple[int, bool]]:
  """``(bytes, in_hbm)`` of each array of an HLO shape, in order. XLA:TPU
  marks arrays placed in other memory spaces (``S(1)``: VMEM, on chip);
  unmarked ones live in HBM."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    bits = re.search(r'\d+$', dtype)  # f32, bf16, s8, ...; pred is a byte.
    size = int(bits.group()) // 8 if bits else 1
    for d in filter(None, dims.split(',')):
      size *= int(d)
    out.append((size, not re.search(r'S\(\d+\)', layout or '')))
  return out


def hbm_traffic(hlo: str) -> int:
  """Bytes read from and written to HBM by a compiled XLA:TPU program without
  conditionals or loops, from where each array lives.

  XLA's ``bytes accessed`` adds up every instruction's operands and results
  wherever they live, so an array staged through on-chip memory counts
  three times (the copy in, the fusion reading the copy, the result); this
  counts only what crosses HBM: a fusion's operands and results in HBM (a
  gather reads the entries it gathers), and the HBM end of each
  asynchronous copy or slice to and from on-chip memory.
  """
  parsed, entry = computations(hlo)
  opcodes = {name: {opcode for _, _, opcode, _ in instructions}
             for name, instructions in parsed.items()}
  shapes: dict[str, str] = {}
  total = 0
  for name, shape, opcode, rest in parsed[entry]:
    shapes[name] = shape
    if opcode in ('conditional', 'while', 'call'):
      raise ValueError(f'{opcode} {name}: count the path taken instead')
    if opcode in _NO_TRAFFIC:
      continue
    arrays = _arrays(shape)
    if opcode in ('slice-start', 'copy-start'):
      # Shaped ((source), destination, context) for a slice, (destination,
      # source, context) for a copy.
      source, destination = arrays[:2]
      if opcode == 'copy-start':
        source, destination = destination, source
      total += destination[0] * (source[1] + destination[1])
      continue
    operands = re.findall(r'%([\w.\-]+)', rest.split(')')[0])
    called = set().union(*(opcodes.get(c, set())
                           for c in _CALLS.findall(rest)))
    if opcode == 'gather' or ('gather' in called and 'reduce' not in called):
      total += sum(size for size, _ in arrays)  # The entries gathered.
    else:
      total += sum(size for o in operands
                   for size, hbm in _arrays(shapes.get(o, '')) if hbm)
    total += sum(size for size, hbm in arrays if hbm)
  return total


def tpu_cost(traced: jax.stages.Traced) -> dict[str, Any]:
  """Bytes accessed and fusion count of ``traced``, compiled for TPU."""
  start = time.perf_counter()
  compiled = traced.lower(lowering_platforms=('tpu',)).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # One dict per program on older jax.
    cost = cost[0]
  hlo = compiled.as_text()
  ops = count_ops(hlo)
  try:
    hbm = float(hbm_traffic(hlo))
  except ValueError:  # A conditional: XLA decides at run time.
    hbm = None
  return {'bytes': float(cost['bytes accessed']), 'hbm': hbm,
          'fusions': ops['fusion'],
          'copies': ops['copy-start'] + ops['copy'],
          'compile_s': time.perf_counter() - start}


def step_of(tx: optax.GradientTransformation) -> Callable:
  """A new step function (a new function: jit's trace cache never serves it)."""
  return lambda params, state, grads: bench_update.apply_step(
      tx, params, state, grads)


def path_text(taken: list[common.Branch]) -> str:
  """The branches taken, in order, runs of one written once with a count
  (``48 x _closed_form.switch:true``: a switch per leaf)."""
  runs = [(str(branch), len(list(group)))
          for branch, group in itertools.groupby(taken)]
  return ' '.join(text if n == 1 else f'{n} x {text}'
                  for text, n in runs) or '(no conditional)'


def whole_and_path(make: Callable[[], Callable], args: tuple, sharding,
                   donate: tuple[int, ...] = (),
                   patch: Callable = contextlib.nullcontext) -> dict[str, Any]:
  """TPU bytes and fusions of ``make()`` on ``args``: the whole program, and
  the path it takes on these concrete ``args``. ``make`` gives a new function
  each call; ``patch()`` is entered while running and tracing."""
  taken: list[common.Branch] = []
  with patch(), common.taken_branches(taken, record=True):
    jax.block_until_ready(make()(*args))  # Eagerly, on the host.
  shapes = abstract(args, sharding)
  with patch():
    whole = tpu_cost(jax.jit(make(), donate_argnums=donate).trace(*shapes))
  path = whole
  if taken:
    with patch(), common.taken_branches(taken, record=False):
      traced = jax.jit(make(), donate_argnums=donate).trace(*shapes)
    left = primitive_names(traced.jaxpr.jaxpr) & {'cond', 'switch'}
    if left:
      raise RuntimeError(f'the path taken still holds {left}: a conditional '
                         f'not made by jax.lax.cond / jax.lax.switch')
    path = tpu_cost(traced)
  return {'path': path_text(taken),
          **{f'{kind}_{key}': value[key] for kind, value
             in (('whole', whole), ('path', path))
             for key in ('bytes', 'hbm', 'fusions', 'copies')},
          'compile_s': whole['compile_s'] + (path['compile_s'] if taken else 0)}


def toy_cond(sharding) -> dict[str, Any]:
  """What XLA:TPU counts for ``x * 2`` alone and for ``lax.cond(p, x * 2,
  x * 2)`` (whole program and path taken), in passes over x (1024 x 1024
  float32)."""
  double = lambda x: x * 2
  x = jnp.ones((1024, 1024), jnp.float32)
  plain = whole_and_path(lambda: double, (x,), sharding)
  under_cond = whole_and_path(
      lambda: lambda p, x: jax.lax.cond(p, double, double, x),
      (jnp.array(True), x), sharding)
  nbytes = x.size * x.dtype.itemsize
  return {'array_bytes': nbytes,
          'plain_passes': plain['whole_bytes'] / nbytes,
          'cond_whole_passes': under_cond['whole_bytes'] / nbytes,
          'cond_path_passes': under_cond['path_bytes'] / nbytes,
          'cond_path': under_cond['path']}


# ---------------------------------------------------------------------------
# The rows.


class Row(NamedTuple):
  """An optimizer to compile: its transformation, matching optax base, the
  library patch of an ablation row, and steps taken before the measured one."""

  make: Callable[[], optax.GradientTransformation]
  base: str | None
  patch: Callable[[Any], Any] | None = None
  advance: int = 0


def tracking(every: int, recorded: bool) -> tuple[str, Row]:
  name = (f'chain(sgd, track_rotation(every={every})), '
          f'{"recorded" if recorded else "other"} step')
  make = lambda: optax.chain(optax.sgd(0.1), lx.track_rotation(every=every))
  return name, Row(make, SGD, advance=every if recorded else every + 1)


def all_rows(every: int) -> dict[str, Row]:
  rows = {name: Row(make, base, patch[0] if patch else None)
          for name, (make, base, _, *patch) in bench_update.OPTIMIZERS.items()}
  rows.update(tracking(every, recorded) for recorded in (True, False))
  return rows


def selected(rows: dict[str, Row], only: list[str] | None) -> list[str]:
  """``only`` (all rows when None), with optax.sgd and their bases first."""
  if not only:
    return list(rows)
  unknown = [n for n in only if n not in rows]
  if unknown:
    raise SystemExit(f'unknown rows {unknown}; known: {list(rows)}')
  needed = {SGD, *only, *(rows[n].base for n in only if rows[n].base)}
  return [n for n in rows if n in needed]


def advanced(tx, params, state, grads, steps: int):
  """(params, state) after ``steps`` jitted steps on the host."""
  step = jax.jit(step_of(tx))
  for _ in range(steps):
    params, state = step(params, state, grads)
  return params, state


def bench_model(model: str, divisor: int, names: list[str],
                rows: dict[str, Row], sharding) -> list[dict[str, Any]]:
  shapes = common.MODELS[model](divisor)
  params0, grads = bench_update.random_inputs(shapes)
  param_bytes = common.tree_bytes(params0)
  out, skipped = [], []
  for name in names:
    row = rows[name]
    tx = row.make()
    params, state = advanced(tx, params0, tx.init(params0), grads, row.advance)
    patch = ((lambda p=params, r=row: r.patch(p)) if row.patch
             else contextlib.nullcontext)
    try:
      measured = whole_and_path(lambda: step_of(tx), (params, state, grads),
                                sharding, donate=(0, 1), patch=patch)
    except bench_update.AblationUnavailable as e:
      print(f'  skipped {model} {name}: {e}', flush=True)
      skipped.append({'model': model, 'optimizer': name,
                      'path': f'skipped: {e}'})
      continue
    out.append({'model': model, 'optimizer': name, 'base': row.base,
                **measured, 'param_bytes': param_bytes,
                'params': common.tree_size(params0), 'leaves': len(shapes),
                'width_divisor': divisor})
    print(f'  compiled {model} {name} ({measured["compile_s"]:.1f} s)',
          flush=True)
  by_name = {r['optimizer']: r for r in out}
  for r in out:
    for kind in ('whole', 'path'):
      r[f'{kind}_MB'] = r[f'{kind}_bytes'] / 1e6
      r[f'{kind}_x_params'] = r[f'{kind}_bytes'] / param_bytes
      for key, ref in (('vs_sgd', SGD), ('vs_base', r['base'])):
        if ref in by_name:
          r[f'{kind}_{key}'] = r[f'{kind}_bytes'] / by_name[ref][f'{kind}_bytes']
    if r['base'] in by_name:
      r['extra_x_params'] = (r['path_bytes']
                             - by_name[r['base']]['path_bytes']) / param_bytes
    r['hbm_x_params'] = r['path_hbm'] / param_bytes
    for key, ref in (('vs_sgd', SGD), ('vs_base', r['base'])):
      if ref in by_name:
        r[f'hbm_{key}'] = r['path_hbm'] / by_name[ref]['path_hbm']
  return out + skipped


COLUMNS = ['model', 'optimizer', 'path_MB', 'path_x_params', 'path_vs_sgd',
           'path_vs_base', 'extra_x_params', 'hbm_x_params', 'hbm_vs_sgd',
           'hbm_vs_base', 'path_fusions', 'path_copies',
           'whole_MB', 'whole_vs_base', 'whole_fusions', 'path']


def tpu_info(sharding, topology: str) -> dict[str, Any]:
  device = next(iter(sharding.device_set))
  return {**common.device_info(), 'platform': 'tpu',
          'device': f'{device.device_kind}, deviceless compile, one chip of '
                    f'{topology}',
          'topology': topology,
          'libtpu': importlib.metadata.version('libtpu')
                    if importlib.util.find_spec('libtpu') else None}


def main() -> None:
  parser = common.json_parser(__doc__.splitlines()[0])
  common.add_model_options(parser, default=['gpt2_small'], divisor_default='1')
  parser.add_argument('--only', nargs='+', default=None,
                      help='rows to compile (optax.sgd and their optax bases '
                           'are always compiled)')
  parser.add_argument('--every', type=int, default=4,
                      help="track_rotation's recording period")
  parser.add_argument('--topology', default='v5e:2x2')
  parser.add_argument('--no-toy', action='store_true',
                      help='skip the lax.cond toy')
  args = parser.parse_args()
  missing = libtpu_missing()
  if missing:
    raise SystemExit(missing)
  # Traced here with the CPU backend: trace the library as a TPU backend
  # does (_closed_form.compiling_for).
  _closed_form.compiling_for = lambda: 'tpu'
  if args.json is None:
    args.json = common.RESULTS_DIR / 'bench_tpu_aot.json'
  sharding = tpu_sharding(args.topology)
  info = tpu_info(sharding, args.topology)
  toy = None if args.no_toy else toy_cond(sharding)
  if toy:
    print(f'lax.cond toy (passes over x): x * 2 alone {toy["plain_passes"]:.3g}, '
          f'cond(p, x * 2, x * 2) {toy["cond_whole_passes"]:.3g}, its path '
          f'taken {toy["cond_path_passes"]:.3g}')
  rows = all_rows(args.every)
  names = selected(rows, args.only)
  divisor = args.width_divisor or 1
  print(f'{info["device"]}, libtpu {info["libtpu"]}, width/{divisor}')
  out = []
  for model in args.models:
    out += bench_model(model, divisor, names, rows, sharding)
  common.report('bench_tpu_aot', out, COLUMNS,
                'XLA:TPU bytes accessed per update step', args, info, toy=toy,
                every=args.every)


if __name__ == '__main__':
  main()
