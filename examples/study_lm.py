"""A character-level language model: tuned AdamW against Layca at the rate
``lx.equilibrium_rate`` derives from that AdamW recipe, with and without
warm-up, and Layca with the rate swept around it.

The text is the Python reference manual that ships with every Python
install (``pydoc_data.topics``, ~465k characters; no download): the first
90% trains, the last 10% validates. The model is a small pre-LayerNorm
transformer (token and position embeddings, causal multi-head attention,
GELU MLP, final LayerNorm, untied head by default), with flax's default
initialisers. Every configuration runs with several seeds, all of one
optimizer family vmapped into one jitted ``lax.scan``.

Runs, all at one budget of steps with one schedule shape (linear warm-up,
then cosine decay to 0; "no warm-up" starts at the peak):

* AdamW (weight decay on kernels and embeddings) at each learning rate of
  ``--lrs``, with and without warm-up: the tuning; the best mean validation
  bits per character with warm-up is the tuned recipe;
* ``lx.layca_adam`` at ``lx.equilibrium_rate('adamw', lr_schedule, wd)``
  from the tuned recipe (the rate follows ``sqrt`` of the learning-rate
  schedule), with and without warm-up;
* ``lx.layca_adam`` at that rate times each factor of ``--rate-factors``.

Layca trains kernels and embeddings (its layers); biases and LayerNorm
parameters follow Adam at the AdamW learning-rate schedule, without decay.

    python examples/study_lm.py --out runs/lm
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import layca_jax as lx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # pylint: disable=g-import-not-at-top,wrong-import-position

PyTree = Any
LN2 = math.log(2.0)
B1 = 0.9  # AdamW's and Layca-Adam's first-moment decay (optax's default).


# ---------------------------------------------------------------------------
# Data.


class Text(NamedTuple):
  train: np.ndarray  # int32 character ids
  val: np.ndarray
  chars: str


def load_text(val_fraction: float = 0.1) -> Text:
  """The Python reference manual's topics, as character ids."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  text = ''.join(topics.topics[key] for key in sorted(topics.topics))
  chars = ''.join(sorted(set(text)))
  index = {c: i for i, c in enumerate(chars)}
  ids = np.fromiter((index[c] for c in text), np.int32, len(text))
  split = int(round((1 - val_fraction) * len(ids)))
  return Text(ids[:split], ids[split:], chars)


def val_windows(val: np.ndarray, context: int, limit: int | None = None
                ) -> np.ndarray:
  """Non-overlapping windows of ``context + 1`` characters of the val split."""
  n = len(val) // (context + 1)
  if limit is not None:
    n = min(n, limit)
  return val[: n * (context + 1)].reshape(n, context + 1)


# ---------------------------------------------------------------------------
# Model.


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, mask=mask)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(h)))


class CharLM(nn.Module):
  """Pre-LayerNorm transformer over characters (flax default initialisers)."""

  vocab: int
  d_model: int = 64
  layers: int = 2
  heads: int = 4
  context: int = 64
  tied: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab, self.d_model)
    positions = nn.Embed(self.context, self.d_model)
    x = embed(tokens) + positions(jnp.arange(tokens.shape[-1]))
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      x = Block(self.heads)(x, mask)
    x = nn.LayerNorm()(x)
    return embed.attend(x) if self.tied else nn.Dense(self.vocab)(x)


def decayed(params: PyTree) -> PyTree:
  """AdamW's weight-decay mask: kernels and embeddings, not biases or
  LayerNorm parameters. These are also the leaves layca-jax takes for layers
  (its default, name-based rule), so Layca turns exactly the leaves that
  AdamW decays."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'embedding'),
      params)


# ---------------------------------------------------------------------------
# Optimizers and training.


class Config(NamedTuple):
  """One run: ``family`` 'adamw' or 'layca'; ``peak_lr`` is AdamW's peak
  learning rate (for Layca, the recipe its rate comes from);
  ``rate_factor`` multiplies Layca's equilibrium rate."""

  name: str
  family: str
  peak_lr: float
  warmup: bool
  rate_factor: float = 1.0


def lr_schedule(peak: jax.Array, warmup_steps: jax.Array, total: int):
  """Linear warm-up over ``warmup_steps`` (0: none), then cosine to 0."""
  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = jnp.where(warmup_steps > 0,
                     jnp.minimum(1.0, (count + 1) / jnp.maximum(warmup_steps, 1)),
                     1.0)
    progress = jnp.clip((count - warmup_steps)
                        / jnp.maximum(total - warmup_steps, 1), 0.0, 1.0)
    return peak * warm * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return schedule


def make_optimizer(family: str, peak: jax.Array, warmup_steps: jax.Array,
                   rate_factor: jax.Array, *, total: int, weight_decay: float
                   ) -> optax.GradientTransformation:
  lr = lr_schedule(peak, warmup_steps, total)
  if family == 'adamw':
    return optax.adamw(lr, b1=B1, weight_decay=weight_decay, mask=decayed)
  rate = lx.equilibrium_rate('adamw', lr, weight_decay, b1=B1)
  return lx.layca_adam(lambda count: rate_factor * rate(count), b1=B1,
                       non_layer_learning_rate=lr)


class Trainer:
  """Trains one family's runs, vmapped over (config, seed), chunk by chunk.

  Each chunk of ``chunk`` steps is one jitted ``lax.scan``; its per-step
  outputs are the training loss and each layer's angle that step
  (``lx.step_rotation``), averaged over the chunk. ``lx.track_rotation``
  records the layer rotation (cosine distance to init) in-graph.
  """

  def __init__(self, model: CharLM, text: Text, family: str, args, *,
               paths: Sequence[str]):
    self.model, self.family, self.args, self.paths = model, family, args, paths
    train = jnp.asarray(text.train)
    context, batch = args.context, args.batch
    record_every = args.steps // args.records

    def loss_fn(params, tokens):
      logits = model.apply({'params': params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, tokens[:, 1:]).mean()

    def optimizer(hyper):
      tx = make_optimizer(family, hyper['peak_lr'], hyper['warmup_steps'],
                          hyper['rate_factor'], total=args.steps,
                          weight_decay=args.weight_decay)
      return optax.chain(tx, lx.track_rotation(
          every=record_every, history=args.records + 1))

    def init(hyper, seed):
      params = model.init(jax.random.PRNGKey(seed),
                          jnp.zeros((1, context), jnp.int32))['params']
      return params, optimizer(hyper).init(params)

    def chunk(hyper, seed, params, state, start):
      tx = optimizer(hyper)
      data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

      def step(carry, t):
        params, state = carry
        starts = jax.random.randint(jax.random.fold_in(data_key, t), (batch,),
                                    0, train.shape[0] - context - 1)
        tokens = jax.vmap(lambda s: jax.lax.dynamic_slice(
            train, (s,), (context + 1,)))(starts)
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        return (new, state), (loss, lx.step_rotation(params, new))

      (params, state), (losses, angles) = jax.lax.scan(
          step, (params, state), start + jnp.arange(args.chunk))
      return (params, state, losses.mean(),
              jax.tree.map(lambda a: a.mean(axis=0), angles))

    def evaluate(params, windows):
      def one(window):
        logits = model.apply({'params': params}, window[None, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, window[None, 1:]).mean()
      return jax.lax.map(one, windows, batch_size=64).mean() / LN2

    in_axes = ({'peak_lr': 0, 'warmup_steps': 0, 'rate_factor': 0}, 0)
    self.init = jax.jit(jax.vmap(init, in_axes=in_axes))
    self.chunk = jax.jit(jax.vmap(chunk, in_axes=in_axes + (0, 0, None)),
                         donate_argnums=(2, 3))
    self.evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None)))

  def run(self, configs: Sequence[Config], seeds: Sequence[int],
          windows: np.ndarray, final_windows: np.ndarray, quiet: bool
          ) -> list[dict[str, Any]]:
    args = self.args
    pairs = [(c, s) for c in configs for s in seeds]
    warmup_steps = int(round(args.warmup * args.steps))
    hyper = {
        'peak_lr': jnp.asarray([c.peak_lr for c, _ in pairs], jnp.float32),
        'warmup_steps': jnp.asarray([warmup_steps if c.warmup else 0
                                     for c, _ in pairs], jnp.float32),
        'rate_factor': jnp.asarray([c.rate_factor for c, _ in pairs],
                                   jnp.float32)}
    seed_ids = jnp.asarray([s for _, s in pairs], jnp.int32)
    params, state = self.init(hyper, seed_ids)
    windows = jnp.asarray(windows)
    log = {'step': [0], 'val_bpc': [np.asarray(self.evaluate(params, windows))],
           'train_loss': [], 'angles': []}
    start_time = time.perf_counter()
    for start in range(0, args.steps, args.chunk):
      params, state, loss, angles = self.chunk(hyper, seed_ids, params, state,
                                               jnp.int32(start))
      log['step'].append(start + args.chunk)
      log['train_loss'].append(np.asarray(loss))
      log['angles'].append(jax.device_get(angles))
      log['val_bpc'].append(np.asarray(self.evaluate(params, windows)))
      if not quiet:
        print(f'  {self.family} step {start + args.chunk}/{args.steps}: '
              f'val bpc {np.array2string(log["val_bpc"][-1], precision=3)} '
              f'({time.perf_counter() - start_time:.0f} s)', flush=True)
    final = np.asarray(self.evaluate(params, jnp.asarray(final_windows)))
    # The tracker records the params it is given, before each step: add the
    # rotation of the final params.
    final_rotation = jax.device_get(jax.jit(jax.vmap(lx.layer_rotation))(
        params, state[-1].init_params))
    steps = np.arange(args.steps)

    def chunk_means(schedule):
      """A per-step schedule's mean over each chunk, as the angles are."""
      values = np.asarray(schedule(steps), np.float64)
      return values.reshape(-1, args.chunk).mean(axis=1).tolist()

    results = []
    for i, (config, seed) in enumerate(pairs):
      one = jax.tree.map(lambda a, i=i: a[i], state)
      history = lx.RotationHistory(order=self.paths)
      history.extend(*lx.rotation_history(one))
      history.record(args.steps,
                     jax.tree.map(lambda a, i=i: a[i], final_rotation))
      lr = lr_schedule(config.peak_lr, hyper['warmup_steps'][i], args.steps)
      angles = [lx.flatten_rotations(jax.tree.map(lambda a, i=i: a[i], chunk),
                                     self.paths) for chunk in log['angles']]
      results.append({
          'name': config.name, 'config': config._asdict(), 'seed': seed,
          'val_bpc': float(final[i]),
          'val_bpc_curve': [float(v[i]) for v in log['val_bpc']],
          'curve_steps': log['step'],
          'train_loss_curve': [float(v[i]) for v in log['train_loss']],
          'angle_curves': {p: [flat[p] for flat in angles]
                           for p in self.paths},
          'predicted_angle_curve': chunk_means(lx.equilibrium_angle(
              'adamw', lr, args.weight_decay, b1=B1)),
          'set_angle_curve': (chunk_means(lambda t: jnp.arctan(
              config.rate_factor * lx.equilibrium_rate(
                  'adamw', lr, args.weight_decay, b1=B1)(t)))
                              if self.family == 'layca' else None),
          'rotation_steps': history.steps,
          'rotation_curves': history.curves,
          'final_rotation': {p: float(c[-1])
                             for p, c in history.curves.items()},
      })
    return results


# ---------------------------------------------------------------------------
# Report.


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per configuration: mean and std over seeds."""
  rows = {}
  for run in runs:
    rows.setdefault(run['name'], []).append(run)
  table = []
  for name, group in rows.items():
    bpc = np.asarray([r['val_bpc'] for r in group])
    rotation = np.asarray([np.mean(list(r['final_rotation'].values()))
                           for r in group])
    early = np.asarray([np.mean([c[0] for c in r['angle_curves'].values()])
                        for r in group])
    table.append({'name': name, 'config': group[0]['config'],
                  'seeds': [r['seed'] for r in group],
                  'val_bpc_mean': float(bpc.mean()),
                  'val_bpc_std': float(bpc.std(ddof=1)) if len(bpc) > 1
                                 else 0.0,
                  'val_bpc_per_seed': bpc.tolist(),
                  'mean_final_rotation': float(rotation.mean()),
                  'mean_angle_first_chunk': float(early.mean())})
  return table


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Mean val bpc of ``a`` minus ``b``, its standard error (Welch, from the
  seeds), and whether ``a`` is worse by more than two standard errors."""
  va, vb = (np.asarray(r['val_bpc_per_seed']) for r in (a, b))
  se = math.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb)) if (
      len(va) > 1 and len(vb) > 1) else float('nan')
  mean = float(va.mean() - vb.mean())
  return {'mean': mean, 'se': se, 'significant_worse': bool(mean > 2 * se)}


def print_table(rows: Sequence[dict[str, Any]], first_chunk: int) -> None:
  print(f"{'run':<44} {'val bpc (mean +- std)':>22} {'per seed':>22} "
        f"{'mean rot.':>9} {'angle, first ' + str(first_chunk):>18}")
  for row in rows:
    seeds = ' '.join(f'{v:.3f}' for v in row['val_bpc_per_seed'])
    print(f"{row['name']:<44} {row['val_bpc_mean']:>14.4f} +- "
          f"{row['val_bpc_std']:.4f} {seeds:>22} "
          f"{row['mean_final_rotation']:>9.3f} "
          f"{row['mean_angle_first_chunk']:>18.5f}")


def plot(runs: Sequence[dict[str, Any]], names: Sequence[str], path: Path
         ) -> Path:
  """Rotation curves (cosine distance to init) and per-step angles of the
  first seed of each named configuration, one column each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  chosen = [next(r for r in runs if r['name'] == n) for n in names]
  fig, axes = plt.subplots(2, len(chosen), figsize=(4.2 * len(chosen), 6.4),
                           squeeze=False)
  for col, run in enumerate(chosen):
    lx.plot_layer_rotation_curves(run['rotation_curves'],
                                  steps=run['rotation_steps'], ax=axes[0, col],
                                  title=run['name'], legend=False)
    axes[0, col].title.set_fontsize('small')
    ax = axes[1, col]
    colours = plt.get_cmap('viridis')(
        np.linspace(0, 1, len(run['angle_curves'])))
    mid = np.asarray(run['curve_steps'][1:]) - (
        run['curve_steps'][1] - run['curve_steps'][0]) / 2
    for (_, curve), colour in zip(run['angle_curves'].items(), colours):
      ax.plot(mid, curve, color=colour)
    ax.plot(mid, run['predicted_angle_curve'], 'k--',
            label='AdamW equilibrium (part 1)')
    ax.set_yscale('log')
    ax.set_xlabel('Step')
    ax.set_ylabel('Angle per step (rad)')
    ax.legend(fontsize='x-small')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=None,
                      help='steps per run (default 1000; 40 with --quick)')
  parser.add_argument('--seeds', type=int, default=None,
                      help='seeds per configuration (default 3; 2 quick)')
  parser.add_argument('--lrs', type=float, nargs='+', default=None,
                      help='AdamW peak learning rates tried')
  parser.add_argument('--rate-factors', type=float, nargs='+', default=None,
                      help="multiples of part 1's Layca rate tried")
  parser.add_argument('--weight-decay', type=float, default=0.1)
  parser.add_argument('--warmup', type=float, default=0.1,
                      help='warm-up length, a fraction of the steps')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--context', type=int, default=64)
  parser.add_argument('--d-model', type=int, default=64)
  parser.add_argument('--layers', type=int, default=2)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--tied', action='store_true',
                      help='tie the output head to the token embedding')
  parser.add_argument('--val-windows', type=int, default=None,
                      help='validation windows for the curves (the final '
                           'figure uses the whole validation split)')
  parser.add_argument('--chunk', type=int, default=None,
                      help='steps per jitted chunk (curve resolution)')
  parser.add_argument('--records', type=int, default=None,
                      help='rotation records per run')
  parser.add_argument('--out', default='.', help='output folder')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny version for tests')
  parser.add_argument('--quiet', action='store_true',
                      help='print only the table')
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = {'steps': 40 if quick else 1000, 'seeds': 2 if quick else 3,
              'lrs': [3e-3, 1e-2] if quick else [3e-3, 1e-2, 3e-2],
              'rate_factors': [4.0] if quick else [0.25, 0.5, 2.0, 4.0]}
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.chunk is None:
    args.chunk = 10 if quick else 50
  if args.val_windows is None:
    args.val_windows = 32 if quick else 128
  if args.records is None:
    args.records = 4 if quick else 20
  if args.steps % args.chunk or args.steps % args.records:
    parser.error('--steps must be a multiple of --chunk and --records')
  if quick:
    args.batch, args.context, args.d_model, args.layers = 8, 32, 32, 1
  Path(args.out).mkdir(parents=True, exist_ok=True)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  started = time.perf_counter()
  text = load_text()
  model = CharLM(len(text.chars), args.d_model, args.layers, args.heads,
                 args.context, args.tied)
  params = model.init(jax.random.PRNGKey(0),
                      jnp.zeros((1, args.context), jnp.int32))['params']
  paths = lx.forward_order(lambda p, x: model.apply({'params': p}, x),
                           params, jnp.zeros((1, args.context), jnp.int32))
  seeds = list(range(args.seeds))
  windows = val_windows(text.val, args.context, limit=args.val_windows)
  final_windows = (windows if args.quick
                   else val_windows(text.val, args.context))

  def train(family: str, configs: Sequence[Config]) -> list[dict[str, Any]]:
    return Trainer(model, text, family, args, paths=paths).run(
        configs, seeds, windows, final_windows, args.quiet)

  # 1. AdamW: each learning rate with and without warm-up, in one batch.
  name = lambda lr, warm: f"AdamW lr {lr:g}, {'warm-up' if warm else 'no warm-up'}"
  runs = train('adamw', [Config(name(lr, warm), 'adamw', lr, warm)
                         for lr in args.lrs for warm in (True, False)])
  tuning = {row['config']['peak_lr']: row for row in summarise(runs)
            if row['config']['warmup']}
  best = min(tuning, key=lambda lr: tuning[lr]['val_bpc_mean'])
  tuned, no_warm = name(best, True), name(best, False)
  # 2. Layca at part 1's rate from the tuned recipe, and around it.
  rate = lx.equilibrium_rate('adamw', best, args.weight_decay, b1=B1)
  layca = [Config(f'Layca-Adam eq. rate, warm-up', 'layca', best, True),
           Config(f'Layca-Adam eq. rate, no warm-up', 'layca', best, False)]
  layca += [Config(f'Layca-Adam {f:g} x eq. rate, warm-up', 'layca', best,
                   True, f) for f in args.rate_factors]
  runs += train('layca', layca)
  rows = summarise(runs)
  by_name = {row['name']: row for row in rows}
  gap = lambda a, b: difference(by_name[a], by_name[b])
  sweep = sorted([by_name[c.name] for c in [layca[0]] + layca[2:]],
                 key=lambda row: row['config']['rate_factor'])
  best_factor = min(sweep, key=lambda row: row['val_bpc_mean'])[
      'config']['rate_factor']
  comparisons = {
      'AdamW: no warm-up minus warm-up': gap(no_warm, tuned),
      'Layca eq. rate: no warm-up minus warm-up': gap(layca[1].name,
                                                      layca[0].name),
      'Layca eq. rate minus tuned AdamW (both warm-up)': gap(layca[0].name,
                                                             tuned),
      'Layca eq. rate minus tuned AdamW (both without warm-up)': gap(
          layca[1].name, no_warm),
  }
  checks = {
      'warm-up helps tuned AdamW (no warm-up worse by > 2 s.e.)':
          comparisons['AdamW: no warm-up minus warm-up']['significant_worse'],
      'warm-up matters less to Layca than to AdamW (smaller bpc gap)':
          abs(comparisons['Layca eq. rate: no warm-up minus warm-up']['mean'])
          < abs(comparisons['AdamW: no warm-up minus warm-up']['mean']),
      "Layca at part 1's rate is no worse than tuned AdamW (within 2 s.e.)":
          not comparisons['Layca eq. rate minus tuned AdamW (both warm-up)'][
              'significant_worse'],
      "part 1's rate is within a factor 2 of the sweep's best Layca rate":
          0.5 <= best_factor <= 2.0,
  }
  out = Path(args.out)
  figure = plot(runs, [tuned, no_warm, layca[0].name, layca[1].name],
                out / 'lm_rotation.png')
  result = {'args': vars(args), 'layers': paths, 'chars': len(text.chars),
            'train_chars': len(text.train), 'val_chars': len(text.val),
            'params': int(sum(x.size for x in jax.tree.leaves(params))),
            'tuned_lr': best, 'equilibrium_rate': rate,
            'best_rate_factor': best_factor, 'comparisons': comparisons,
            'equilibrium_angle': lx.equilibrium_angle(
                'adamw', best, args.weight_decay, b1=B1),
            'table': rows, 'checks': checks, 'runs': runs,
            'seconds': time.perf_counter() - started}
  json_path = out / 'lm.json'
  _report.write_json(json_path, result)
  print_table(rows, args.chunk)
  print(f"tuned AdamW lr {best:g}; part 1's Layca rate at its peak "
        f'{rate:.3e} (angle {result["equilibrium_angle"]:.3e} rad/step); best '
        f'rate factor of the sweep {best_factor:g}')
  for what, d in comparisons.items():
    print(f"{what}: {d['mean']:+.4f} +- {d['se']:.4f} bpc")
  for claim, holds in checks.items():
    print(f"[{'holds' if holds else 'does not hold'}] {claim}")
  print(f'{result["seconds"]:.0f} s; wrote {json_path}, {figure}')
  return result


if __name__ == '__main__':
  sys.exit(main() and None)
