"""Peak host memory of one donated, jitted update step on CPU.

Usage::

  python benchmarks/bench_memory.py [--json benchmarks/results/memory_cpu.json]
      [--scale 1.0] [--variants sgd,layca_sgd,...]

Params: GPT-2-small-like float32 shapes (~124M parameters at ``--scale 1``;
embeddings, 12 blocks of attention and MLP kernels, biases and layer norms).

Method. jax's ``memory_stats()`` is GPU/TPU-only and ``tracemalloc`` does
not see XLA's buffers, so each variant runs in a fresh subprocess and reads
the kernel's own accounting of its resident set: the RSS
(``/proc/self/statm``) just before the step, and the high-water mark of the
RSS over the step. The mark is reset right before the step by writing ``5``
to ``/proc/self/clear_refs`` (Linux >= 4.0) and read as ``VmHWM`` from
``/proc/self/status`` after it; where the reset is refused, the fallback is
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which also covers the setup
(the row then says whether the step's peak rose above it). The step is
compiled ahead of time (``jit(...).lower(...).compile()``), params and
optimizer state are donated, and every array is created leaf by leaf by
jitted functions (no NumPy float64 temporaries), so
``step_overhead = peak - rss_before`` is what the update itself adds on top
of params, grads and state. ``process peak`` (setup included) is the figure
to budget with: XLA's CPU runtime keeps memory freed by ``init`` resident,
and the step reuses it without raising the RSS. The children run with glibc's mmap and trim
thresholds fixed at 128 KiB (``MALLOC_ENV``) so that freed buffers leave the
RSS instead of being recycled unseen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

VARIANTS = ('sgd', 'layca_sgd', 'sgd_momentum', 'layca_sgd_momentum')
# glibc keeps freed heap blocks (and, by default, raises its mmap threshold
# after the first large free), so memory freed by init would be reused by the
# step unseen. Fixed thresholds put every buffer over 128 KiB in its own mmap
# and hand it back on free: the RSS then follows XLA's live buffers.
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072',
              'MALLOC_TRIM_THRESHOLD_': '131072'}
MIB = 2 ** 20


def gpt2_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
  d = max(8, int(768 * scale ** 0.5))
  vocab, ctx, layers = int(50257 * scale ** 0.5), 1024, 12
  shapes = {'wte/embedding': (vocab, d), 'wpe/embedding': (ctx, d),
            'ln_f/scale': (d,), 'ln_f/bias': (d,)}
  for i in range(layers):
    block = {'ln_1/scale': (d,), 'ln_1/bias': (d,),
             'attn/c_attn/kernel': (d, 3 * d), 'attn/c_attn/bias': (3 * d,),
             'attn/c_proj/kernel': (d, d), 'attn/c_proj/bias': (d,),
             'ln_2/scale': (d,), 'ln_2/bias': (d,),
             'mlp/c_fc/kernel': (d, 4 * d), 'mlp/c_fc/bias': (4 * d,),
             'mlp/c_proj/kernel': (4 * d, d), 'mlp/c_proj/bias': (d,)}
    shapes.update({f'h_{i}/{k}': v for k, v in block.items()})
  return shapes


def make_tx(variant: str):
  import optax
  import layca_jax as lx
  return {
      'sgd': lambda: optax.sgd(0.1),
      'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
      'layca_sgd': lambda: lx.layca_sgd(0.1),
      'layca_sgd_momentum': lambda: lx.layca_sgd(0.1, momentum=0.9),
      'adam': lambda: optax.adam(1e-3),
      'layca_adam': lambda: lx.layca_adam(1e-3),
  }[variant]()


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_bytes() -> int:
  """High-water mark of the RSS (since the last reset_peak, if it worked)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB.


def reset_peak() -> bool:
  """Resets the RSS high-water mark to the current RSS; False if refused."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def measure(variant: str, scale: float, steps: int = 2) -> dict:
  """In this (fresh) process: RSS before and peak after a donated step."""
  import jax
  import optax

  shapes = gpt2_shapes(scale)
  normal = jax.jit(lambda key, shape: jax.random.normal(key, shape),
                   static_argnums=1)
  make = lambda seed: {  # Leaf by leaf: transients of one leaf at most.
      name: normal(jax.random.key(seed * 100_000 + i), shape)
      for i, (name, shape) in enumerate(shapes.items())}
  params = make(0)
  grads = make(1)
  tx = make_tx(variant)
  state = jax.jit(tx.init)(params)
  jax.block_until_ready((params, grads, state))

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  peak_setup = peak_bytes()
  reset = reset_peak()
  rss_before, peak_before = rss_bytes(), peak_bytes()
  for _ in range(steps):
    params, state = compiled(params, state, grads)
  jax.block_until_ready((params, state))
  peak_after = peak_bytes()
  return {
      'variant': variant, 'params': n_params, 'param_bytes': 4 * n_params,
      'state_bytes': state_bytes, 'peak_setup': peak_setup,
      'peak_reset': reset, 'rss_before_step': rss_before,
      'peak_before_step': peak_before, 'peak_after_step': peak_after,
      'step_overhead': peak_after - rss_before,
      'resolved': peak_after > peak_before,
  }


def run_variant(variant: str, scale: float) -> dict:
  proc = subprocess.run(
      [sys.executable, __file__, '--child', variant, '--scale', str(scale)],
      capture_output=True, text=True, timeout=1800,
      env=dict(os.environ, JAX_PLATFORMS='cpu', **MALLOC_ENV))
  if proc.returncode != 0:
    raise RuntimeError(f'{variant} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  header = (f'{"variant":<20} {"state MiB":>10} {"process peak":>13} '
            f'{"RSS before":>11} {"step peak":>10} {"step overhead":>14} '
            f'{"vs params":>10}')
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(
        f'{r["variant"]:<20} {r["state_bytes"] / MIB:>10.1f} '
        f'{max(r["peak_setup"], r["peak_after_step"]) / MIB:>13.1f} '
        f'{r["rss_before_step"] / MIB:>11.1f} {r["peak_after_step"] / MIB:>10.1f} '
        f'{r["step_overhead"] / MIB:>14.1f} '
        f'{r["step_overhead"] / r["param_bytes"]:>9.2f}x'
        + ('' if r['resolved'] else '  (peak hidden by setup)'))
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', default='benchmarks/results/memory_cpu.json')
  parser.add_argument('--scale', type=float, default=1.0,
                      help='params scale (1.0: ~124M parameters)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.scale)))
    return
  import jax
  rows = [run_variant(v, args.scale) for v in args.variants.split(',')]
  print(f'{rows[0]["params"] / 1e6:.1f}M float32 params '
        f'({rows[0]["param_bytes"] / MIB:.0f} MiB), donated jitted step, '
        f'CPU, one process per variant (MiB)')
  print(table(rows))
  out = Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      'method': 'fresh subprocess per variant; RSS high-water mark reset '
                '(/proc/self/clear_refs) before the donated step; '
                'step_overhead = VmHWM after the step - RSS before it',
      'jax': jax.__version__, 'machine': platform.platform(),
      'cpu_count': os.cpu_count(), 'rows': rows}, indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
