"""What the benchmark scripts share: parameter shapes, device-side timing, tables, JSON.

Times are device-side: ``steps`` iterations run inside one ``jit`` (a
``lax.fori_loop``), after a warm-up call that compiles and runs once, and the
clock stops at ``block_until_ready``. Each measurement is repeated and the
median per-step time is reported (the minimum is kept in the JSON too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import unittest.mock
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / 'results'

# ---------------------------------------------------------------------------
# Parameter shapes (flax layouts: conv kernels HWIO, dense kernels (in, out)).


def resnet50_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
  """ResNet-50's 161 parameter tensors (25.6M at full width, 1000 classes).

  Conv and dense kernels, BatchNorm scales and biases, the classifier bias.
  ``width_divisor`` divides every channel count (and the class count).
  """
  c = lambda n: max(1, n // width_divisor)
  shapes = {'conv_init/kernel': (7, 7, 3, c(64)),
            'bn_init/scale': (c(64),), 'bn_init/bias': (c(64),)}
  cin = c(64)
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for b in range(blocks):
      name = f'stage{stage + 1}_block{b}'
      mid, out = c(width), c(4 * width)
      for i, (k, ci, co) in enumerate(((1, cin, mid), (3, mid, mid), (1, mid, out))):
        shapes[f'{name}/conv_{i}/kernel'] = (k, k, ci, co)
        shapes[f'{name}/bn_{i}/scale'] = (co,)
        shapes[f'{name}/bn_{i}/bias'] = (co,)
      if b == 0:
        shapes[f'{name}/proj/kernel'] = (1, 1, cin, out)
        shapes[f'{name}/proj_bn/scale'] = (out,)
        shapes[f'{name}/proj_bn/bias'] = (out,)
      cin = out
  shapes['head/kernel'] = (cin, c(1000))
  shapes['head/bias'] = (c(1000),)
  return shapes


def gpt2_small_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
  """GPT-2-small's 148 parameter tensors (124M at full width).

  ``width_divisor`` divides the model width, the vocabulary and the context.
  """
  d = 768 // width_divisor
  vocab, ctx = 50257 // width_divisor, 1024 // width_divisor
  shapes = {'wte/embedding': (vocab, d), 'wpe/embedding': (ctx, d)}
  for i in range(12):
    h = f'h_{i}'
    shapes.update({
        f'{h}/ln_1/scale': (d,), f'{h}/ln_1/bias': (d,),
        f'{h}/attn/c_attn/kernel': (d, 3 * d), f'{h}/attn/c_attn/bias': (3 * d,),
        f'{h}/attn/c_proj/kernel': (d, d), f'{h}/attn/c_proj/bias': (d,),
        f'{h}/ln_2/scale': (d,), f'{h}/ln_2/bias': (d,),
        f'{h}/mlp/c_fc/kernel': (d, 4 * d), f'{h}/mlp/c_fc/bias': (4 * d,),
        f'{h}/mlp/c_proj/kernel': (4 * d, d), f'{h}/mlp/c_proj/bias': (d,),
    })
  shapes['ln_f/scale'] = (d,)
  shapes['ln_f/bias'] = (d,)
  return shapes


def smoke_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
  """Four leaves, for checking that a benchmark runs (not for timing)."""
  del width_divisor
  return {'conv/kernel': (3, 3, 8, 16), 'bn/scale': (16,),
          'dense/kernel': (64, 10), 'dense/bias': (10,)}


MODELS: dict[str, Callable[[int], dict[str, tuple[int, ...]]]] = {
    'resnet50': resnet50_shapes,
    'gpt2_small': gpt2_small_shapes,
    'smoke': smoke_shapes,
}
TIMED_MODELS = ['resnet50', 'gpt2_small']


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, last = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int,
                scale: float = 1.0, dtype=jnp.float32) -> dict[str, Any]:
  """A nested dict of device arrays of the given shapes, N(0, scale^2)."""
  key = jax.random.PRNGKey(seed)
  keys = jax.random.split(key, len(shapes))
  flat = {p: (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
          for k, (p, s) in zip(keys, shapes.items())}
  return nest(flat)


def random_like(tree: Any, seed: int, scale: float = 1.0) -> Any:
  """A tree like ``tree`` (structure, shapes, dtypes) of N(0, scale^2) arrays."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([
      (scale * jax.random.normal(k, jnp.shape(x), jnp.float32)).astype(
          jnp.result_type(x)) for k, x in zip(keys, leaves)])


def tree_size(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Timing.


def time_call(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def time_interleaved(fns: dict[str, Callable[[], Any]],
                     repeats: int) -> dict[str, list[float]]:
  """Wall seconds of each function, timed in ``repeats`` interleaved rounds.

  Each function is warmed up once, then every round calls each one once:
  on a shared machine, load changes hit all of them alike, so their ratios
  stay meaningful.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def per_step(times: Sequence[float], steps: int) -> dict[str, float]:
  """Median and minimum per-step milliseconds."""
  return {'ms': 1e3 * statistics.median(times) / steps,
          'min_ms': 1e3 * min(times) / steps}


def ratio_rows(times: dict[str, Sequence[float]], steps: int, baseline: str,
               label: str, ratio: str, **extra: Any) -> list[dict[str, Any]]:
  """One row per timed function: per-step times, and ``ratio`` (and
  ``ratio + '_min'``) to ``baseline`` from the medians (and the minima)."""
  base = per_step(times[baseline], steps)
  rows = []
  for name, t in times.items():
    row = {label: name, **per_step(t, steps)}
    row[ratio] = row['ms'] / base['ms']
    row[ratio + '_min'] = row['min_ms'] / base['min_ms']
    rows.append({**row, **extra})
  return rows


def copy_loop(num_bytes: int, steps: int) -> Callable[[], Any]:
  """A zero-argument function making ``steps`` read-plus-write passes over
  ``num_bytes`` of float32 inside one jit (``x <- x * c``, ``c`` varying per
  iteration): time it beside the rows it is a roof for."""
  x = jnp.ones((max(1, num_bytes // 4),), jnp.float32)

  @jax.jit
  def run(x):
    return jax.lax.fori_loop(
        0, steps, lambda i, x: x * (1.0 + 1e-7 * i.astype(jnp.float32)), x)

  return lambda: run(x)


def copy_bandwidth(times: Sequence[float], num_bytes: int, steps: int) -> float:
  """Bytes/s of :func:`copy_loop` from its measured times (median)."""
  return 2 * num_bytes * steps / statistics.median(times)


# ---------------------------------------------------------------------------
# The branches a step takes.


class Branch(NamedTuple):
  """One ``lax.cond`` (``index`` 1 is the true branch) or ``lax.switch`` call."""

  site: str   # module.function that called it.
  kind: str   # 'cond' or 'switch'.
  index: int

  def __str__(self) -> str:
    taken = ('true' if self.index else 'false') if self.kind == 'cond' \
        else str(self.index)
    return f'{self.site}:{taken}'


@contextlib.contextmanager
def taken_branches(taken: list[Branch], record: bool) -> Iterator[None]:
  """Within it, ``jax.lax.cond`` and ``jax.lax.switch`` run only one branch.

  Recording (``record=True``), their predicate must be concrete: run the
  step eagerly, on concrete inputs; each call appends the branch it took to
  ``taken``. Replaying, each call takes the next branch of ``taken`` (from
  the same call site, else RuntimeError): tracing under it stages the path
  the recorded run took and no conditional. With no conditional in the step,
  ``taken`` stays empty and the path is the whole program.
  """
  replay = iter(taken)

  def choose(kind: str, index: Any, count: int) -> int:
    caller = sys._getframe(2)
    site = (f"{caller.f_globals.get('__name__', '?').rsplit('.', 1)[-1]}."
            f'{caller.f_code.co_name}')
    if record:
      try:
        i = min(max(int(index), 0), count - 1)  # lax.switch clamps.
      except jax.errors.ConcretizationTypeError as e:
        raise RuntimeError(
            f'{site}: the {kind} predicate is traced; record the path by '
            f'running the step eagerly') from e
      taken.append(Branch(site, kind, i))
      return i
    branch = next(replay, None)
    if branch is None or (branch.site, branch.kind) != (site, kind):
      raise RuntimeError(f'{kind} at {site} is not the recorded {branch}')
    return branch.index

  def operands_of(operands, kwargs):
    return (kwargs['operand'],) if 'operand' in kwargs else operands

  def cond(pred, true_fun, false_fun, *operands, **kwargs):
    fun = (false_fun, true_fun)[choose('cond', pred, 2)]
    return fun(*operands_of(operands, kwargs))

  def switch(index, branches, *operands, **kwargs):
    branches = list(branches)
    fun = branches[choose('switch', index, len(branches))]
    return fun(*operands_of(operands, kwargs))

  with unittest.mock.patch.object(jax.lax, 'cond', cond), \
      unittest.mock.patch.object(jax.lax, 'switch', switch):
    yield
  if not record and next(replay, None) is not None:
    raise RuntimeError('the trace made fewer conditionals than were recorded')


# ---------------------------------------------------------------------------
# Reporting.


def device_info() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      'platform': dev.platform,
      'device': getattr(dev, 'device_kind', str(dev)),
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'jax': jax.__version__,
      'python': sys.version.split()[0],
      'machine': platform.machine(),
      'time': time.strftime('%Y-%m-%d %H:%M:%S'),
  }


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                title: str = '') -> None:
  """Prints ``rows`` as a markdown table of ``columns``."""
  def fmt(v):
    if isinstance(v, float):
      return f'{v:.4g}' if abs(v) < 1e4 else f'{v:.3e}'
    return '' if v is None else str(v)

  if title:
    print(f'\n### {title}\n')
  print('| ' + ' | '.join(columns) + ' |')
  print('| ' + ' | '.join('---' for _ in columns) + ' |')
  for row in rows:
    print('| ' + ' | '.join(fmt(row.get(c)) for c in columns) + ' |')
  sys.stdout.flush()


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, default=float))
  print(f'\nwrote {path}')
  return path


def report(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
           title: str, args: argparse.Namespace,
           info: dict[str, Any] | None = None, **payload: Any) -> None:
  """Prints the table and writes the JSON of benchmark ``name``."""
  info = info or device_info()
  print_table(rows, columns, title=f'{title} ({info["device"]})')
  write_json(args.json or default_json_path(name),
             {'benchmark': name, 'info': info, **payload, 'rows': list(rows)})


def default_json_path(name: str) -> Path:
  return RESULTS_DIR / f'{name}_{jax.devices()[0].platform}.json'


def json_parser(description: str) -> argparse.ArgumentParser:
  """A parser with the one option every benchmark has, ``--json``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--json', default=None,
                      help='where to write the JSON (default: benchmarks/results/)')
  return parser


def base_parser(description: str) -> argparse.ArgumentParser:
  """:func:`json_parser` plus the timing options (``--full``, ``--steps``,
  ``--repeats``)."""
  parser = json_parser(description)
  parser.add_argument('--full', action='store_true',
                      help='full-size shapes (default: scaled down on CPU)')
  parser.add_argument('--steps', type=int, default=None,
                      help='steps inside one jit per timed call')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed calls per row (median reported)')
  return parser


def on_cpu() -> bool:
  return jax.devices()[0].platform == 'cpu'


def add_model_options(parser: argparse.ArgumentParser,
                      default: Sequence[str] = tuple(TIMED_MODELS),
                      divisor_default: str = '1 with --full or on GPU, 4 on CPU',
                      ) -> argparse.ArgumentParser:
  """Adds the model-shape options (``--models``, ``--width-divisor``)."""
  parser.add_argument('--models', nargs='*', default=list(default),
                      choices=list(MODELS))
  parser.add_argument('--width-divisor', type=int, default=None,
                      help=f'divide channel widths (default: {divisor_default})')
  return parser


def shapes_parser(description: str) -> argparse.ArgumentParser:
  """:func:`base_parser` plus the model-shape options."""
  return add_model_options(base_parser(description))


class RunSize(NamedTuple):
  """Shape scaling and timing counts of one benchmark run."""

  divisor: int
  steps: int
  repeats: int


def run_size(args: argparse.Namespace, cpu_repeats: int = 5) -> RunSize:
  """Scaled-down shapes and fewer steps on CPU unless ``--full``; flags win."""
  cpu = on_cpu()
  return RunSize(args.width_divisor or (4 if cpu and not args.full else 1),
                 args.steps or (10 if cpu else 50),
                 args.repeats or (cpu_repeats if cpu else 10))
