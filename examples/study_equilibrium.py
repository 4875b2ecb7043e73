"""Rotational equilibrium, measured: each layer's per-step angle under AdamW,
SGD with momentum + L2 and Lion, against ``lx.equilibrium_angle``.

An MLP on scikit-learn's 8x8 digits whose hidden kernels are scale-invariant
(``Dense(use_bias=False) -> LayerNorm -> ReLU``, three times) and whose output
layer (``Dense(10)`` with a bias) is not. Each recipe trains long enough for
the weight norms to settle (the relaxation time ``1 / (2 lr wd)`` steps for
AdamW and Lion, ``(1 - m) / (4 lr wd)`` for SGD, is at most a tenth of the
run); the per-step angle of every layer, ``lx.step_rotation(before, after)``
measured in the jitted step, is averaged over the last third of training and
set against the prediction of Kosson et al. (arXiv 2305.17212). Gaussian
noise on the inputs keeps the gradients noisy (without it the MLP fits the
digits and its gradients vanish, and no equilibrium is reached).

A diagnostic of the formulas' random-walk assumption, per layer: the cosine
between the optimizer's direction (the update without its decay) and the
weights. In the random walk it is ``-angle * memory`` (``Recipe.memory``:
the direction's summed correlation with its past values, from momentum); a
markedly more negative value means successive directions keep pushing the
weights outward together, which inflates the norm and shrinks the angle.

    python examples/study_equilibrium.py --out runs/equilibrium
"""

from __future__ import annotations

import argparse
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

# A disagreement beyond this fraction is flagged and explained in the README.
TOLERANCE = 0.25


class Recipe(NamedTuple):
  """One optimizer setting: its name for ``lx.equilibrium_angle`` and its
  hyperparameters (``hyper`` as that function takes them)."""

  optimizer: str
  learning_rate: float
  weight_decay: float
  hyper: dict[str, float]

  @property
  def label(self) -> str:
    extra = ', '.join(f'{k} {v:g}' for k, v in self.hyper.items())
    return (f'{self.optimizer} lr {self.learning_rate:g}, wd '
            f'{self.weight_decay:g}' + (f', {extra}' if extra else ''))

  def transform(self) -> optax.GradientTransformation:
    """The plain optax optimizer this recipe names."""
    lr, wd = self.learning_rate, self.weight_decay
    if self.optimizer == 'adamw':
      return optax.adamw(lr, weight_decay=wd, **self.hyper)
    if self.optimizer == 'sgd':  # L2 added to the gradient, as torch's SGD.
      return optax.chain(optax.add_decayed_weights(wd),
                         optax.sgd(lr, momentum=self.hyper['momentum']))
    if self.optimizer == 'lion':
      return optax.lion(lr, weight_decay=wd, **self.hyper)
    raise ValueError(f'unknown optimizer {self.optimizer!r}')

  def predicted_angle(self) -> float:
    return lx.equilibrium_angle(self.optimizer, self.learning_rate,
                                self.weight_decay, **self.hyper)

  def memory(self) -> float:
    """``sum_k rho_k``: the summed correlation of a direction with the
    directions ``k = 1, 2, ...`` steps before it, for uncorrelated gradients.

    In the random walk the formulas assume, the direction ``u_t`` meets the
    weights (which hold ``-lr * u_{t-k}`` for all past ``k``) at the cosine
    ``<u_t, w_t> / (|u_t| |w_t|) = -angle * memory``. Momentum ``m`` (SGD)
    or ``b1`` (AdamW): ``rho_k = m ** k``; Lion: ``sign`` of Gaussian
    momenta, ``rho_k = 2 / pi * asin(corr_k)`` (the arcsine law).
    """
    if self.optimizer == 'sgd':
      return self.hyper['momentum'] / (1 - self.hyper['momentum'])
    b1 = self.hyper.get('b1', 0.9)
    if self.optimizer == 'adamw':
      return b1 / (1 - b1)
    b2 = self.hyper.get('b2', 0.99)
    lags = np.arange(1, 20000)
    weights = np.concatenate([[1 - b1], b1 * (1 - b2) * b2 ** (lags - 1)])
    corr = np.asarray([weights[:-k] @ weights[k:] for k in lags[:5000]]) / (
        weights @ weights)
    return float(np.sum(2 / np.pi * np.arcsin(corr)))

  def relaxation_steps(self) -> float:
    """Time constant of the norm's approach to equilibrium, in steps."""
    rate = self.learning_rate * self.weight_decay
    if self.optimizer == 'sgd':
      return (1.0 - self.hyper['momentum']) / (4.0 * rate)
    return 1.0 / (2.0 * rate)


# Chosen so that the norms relax within a tenth of the default run (time
# constants of 250 steps) and, for Lion, the momentum's memory 1 / (1 - b2)
# stays short next to that (20 steps).
RECIPES = (
    Recipe('adamw', 2e-3, 1.0, {'b1': 0.9}),
    Recipe('adamw', 2e-3, 1.0, {'b1': 0.5}),
    Recipe('sgd', 0.1, 1e-3, {'momentum': 0.9}),
    Recipe('sgd', 0.2, 5e-3, {'momentum': 0.0}),
    Recipe('lion', 5e-4, 4.0, {'b1': 0.9, 'b2': 0.95}),
    Recipe('lion', 5e-4, 4.0, {'b1': 0.5, 'b2': 0.95}),
)


class MLP(nn.Module):
  """Scale-invariant hidden kernels (no bias, LayerNorm after), plain head."""

  width: int = 256
  depth: int = 3
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = getattr(nn, self.activation)
    for _ in range(self.depth):
      x = act(nn.LayerNorm()(nn.Dense(self.width, use_bias=False)(x)))
    return nn.Dense(10)(x)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits (ships with the package), standardised."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top
  x, y = sklearn_digits(return_X_y=True)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  return x.astype(np.float32), y.astype(np.int32)


def layer_paths(params: Any) -> list[str]:
  """'/'-joined paths of the layers (kernels), in forward order."""
  rotations = lx.layer_rotation(params, params)
  return list(lx.flatten_rotations(rotations))


def at_paths(tree: Any, paths: Sequence[str]) -> list[Any]:
  """The leaves of a nested-dict ``tree`` at '/'-joined ``paths``."""
  values = []
  for path in paths:
    node = tree
    for key in path.split('/'):
      node = node[key]
    values.append(node)
  return values


def make_train(model: MLP, recipe_optimizer: str, x: np.ndarray,
               y: np.ndarray, paths: Sequence[str], *, steps: int, batch: int,
               record_every: int, noise: float):
  """A jitted function of (learning_rate, weight_decay, hyper, seeds) that
  trains one MLP per seed (vmapped) for ``steps`` steps in a ``lax.scan``.

  Every step draws a batch, adds Gaussian noise of std ``noise`` to its
  inputs (so that the gradients stay noisy: without it the MLP fits the
  digits and its gradients vanish), and records per layer (``paths``): the
  angle it turned (``lx.step_rotation``, whole layer), the RMS over output
  neurons of their angles, its norm, and the cosine between the optimizer's
  direction (the update without its decay) and the weights. Returns those
  ``[seeds, steps, layers]`` arrays, the optimizer state (with ``lx.track_rotation``'s
  history) and each seed's final training accuracy on clean inputs.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss_fn(params, xb, yb):
    logits = model.apply({'params': params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def run(learning_rate, weight_decay, hyper, seed):
    recipe = Recipe(recipe_optimizer, learning_rate, weight_decay, hyper)
    tx = optax.chain(recipe.transform(),
                     lx.track_rotation(every=record_every,
                                       history=steps // record_every))
    key = jax.random.PRNGKey(seed)
    init_key, data_key = jax.random.split(key)
    params = model.init(init_key, x[:1])['params']
    state = tx.init(params)

    def cosine(a, b):
      return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))

    def step(carry, key):
      params, state, momentum = carry
      index_key, noise_key = jax.random.split(key)
      index = jax.random.randint(index_key, (batch,), 0, x.shape[0])
      xb = x[index] + noise * jax.random.normal(noise_key, (batch, x.shape[1]))
      loss, grads = jax.value_and_grad(loss_fn)(params, xb, y[index])
      updates, state = tx.update(grads, state, params)
      new = optax.apply_updates(params, updates)
      if recipe_optimizer == 'sgd':
        # The direction without the decay: the momentum of the gradients.
        momentum = jax.tree.map(lambda m, g: hyper['momentum'] * m + g,
                                momentum, grads)
        directions = at_paths(momentum, paths)
      else:
        # AdamW and Lion step by -lr * (direction + wd * w).
        directions = [(b - a) / learning_rate - weight_decay * b for b, a in
                      zip(at_paths(params, paths), at_paths(new, paths))]
      neurons = at_paths(lx.step_rotation(params, new, per_neuron=True), paths)
      record = {
          'angle': jnp.stack(at_paths(lx.step_rotation(params, new), paths)),
          'neuron_rms_angle': jnp.stack(
              [jnp.sqrt(jnp.mean(a * a)) for a in neurons]),
          'norm': jnp.stack([jnp.linalg.norm(w) for w in at_paths(new, paths)]),
          'radial_cosine': jnp.stack(
              [cosine(u, w) for u, w in zip(directions,
                                            at_paths(params, paths))]),
      }
      return (new, state, momentum), (loss, record)

    momentum = jax.tree.map(jnp.zeros_like, params)
    (params, state, _), (loss, record) = jax.lax.scan(
        step, (params, state, momentum), jax.random.split(data_key, steps))
    accuracy = jnp.mean(jnp.argmax(model.apply({'params': params}, x), -1)
                        == y)
    return loss, record, state, accuracy

  return jax.jit(jax.vmap(run, in_axes=(None, None, None, 0)))


def summarise(recipe: Recipe, loss: Any, record: Any, state: Any,
              accuracy: Any, paths: Sequence[str], window: slice,
              seeds: Sequence[int]) -> dict[str, Any]:
  """Per layer: measured mean angle over the window (per seed), the RMS over
  neurons, the norm's drift across the window, the direction's radial
  cosine, and the prediction."""
  loss, record = jax.device_get((loss, record))
  predicted = recipe.predicted_angle()
  memory = recipe.memory()
  layers = {}
  for i, path in enumerate(paths):
    measured = record['angle'][:, window, i].mean(axis=1)     # one per seed
    norm = record['norm'][:, window, i]
    layers[path] = {
        'measured_angle_per_seed': measured,
        'measured_angle': float(measured.mean()),
        'measured_angle_std_over_seeds': float(measured.std()),
        'neuron_rms_angle': float(
            record['neuron_rms_angle'][:, window, i].mean()),
        'norm_drift_over_window': float(np.mean(norm[:, -1] / norm[:, 0] - 1)),
        'radial_cosine': float(record['radial_cosine'][:, window, i].mean()),
        'radial_cosine_random_walk': float(-measured.mean() * memory),
        'ratio': float(measured.mean() / predicted),
    }
  curves = {}
  for i, seed in enumerate(seeds):
    history = lx.RotationHistory(order=paths)
    history.extend(*lx.rotation_history(jax.tree.map(lambda a: a[i], state)))
    curves[seed] = {'steps': history.steps, **history.curves}
  return {
      'recipe': recipe._asdict(), 'label': recipe.label,
      'predicted_angle': predicted,
      'relaxation_steps': recipe.relaxation_steps(),
      'memory': memory,
      'train_accuracy_per_seed': np.asarray(accuracy),
      'final_loss_per_seed': loss[:, -100:].mean(axis=1),
      'layers': layers,
      'angle_curves': {p: record['angle'][:, :, i].mean(axis=0)
                       for i, p in enumerate(paths)},
      'rotation_curves': curves,
  }


def table(runs: Sequence[dict[str, Any]], paths: Sequence[str]) -> str:
  """Measured against predicted per-step angle, one row per recipe and
  layer; ``*`` marks a disagreement beyond the tolerance."""
  lines = [f"{'recipe':<38} {'layer':<15} {'predicted':>9} {'measured':>15} "
           f"{'ratio':>6} {'neuron rms':>10} {'norm drift':>10} "
           f"{'radial cos: measured / random walk':>34}"]
  for run in runs:
    for path in paths:
      layer = run['layers'][path]
      flag = ' *' if abs(layer['ratio'] - 1) > TOLERANCE else ''
      lines.append(
          f"{run['label']:<38} {path:<15} {run['predicted_angle']:>9.5f} "
          f"{layer['measured_angle']:>9.5f}+-{layer['measured_angle_std_over_seeds']:.5f} "
          f"{layer['ratio']:>6.3f} {layer['neuron_rms_angle']:>10.5f} "
          f"{layer['norm_drift_over_window']:>+10.1%} "
          f"{layer['radial_cosine']:>+25.3f} / "
          f"{layer['radial_cosine_random_walk']:+.3f}{flag}")
  return '\n'.join(lines)


def plot(runs: Sequence[dict[str, Any]], paths: Sequence[str], steps: int,
         path: Path) -> Path:
  """Per-step angle of every layer over training (seed mean, smoothed),
  against the predicted equilibrium (dashed), one panel per recipe."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ncols = min(len(runs), 2)
  nrows = -(-len(runs) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.2 * nrows),
                           squeeze=False)
  colours = plt.get_cmap('viridis')(np.linspace(0, 1, len(paths)))
  width = max(steps // 100, 1)
  kernel = np.ones(width) / width
  for ax, run in zip(axes.flat, runs):
    for layer, colour in zip(paths, colours):
      curve = np.convolve(run['angle_curves'][layer], kernel, mode='valid')
      ax.plot(np.arange(len(curve)) + width, curve, color=colour, label=layer)
    ax.axhline(run['predicted_angle'], color='k', ls='--', label='predicted')
    ax.set_yscale('log')
    ax.set_title(run['label'], fontsize='small')
    ax.set_xlabel('Step')
    ax.set_ylabel('Angle per step (rad)')
  axes.flat[0].legend(fontsize='x-small')
  for ax in list(axes.flat)[len(runs):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_rotation(runs: Sequence[dict[str, Any]], path: Path) -> Path:
  """Layer-rotation curves (cosine distance to init) of the first seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ncols = min(len(runs), 3)
  nrows = -(-len(runs) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows),
                           squeeze=False)
  for ax, run in zip(axes.flat, runs):
    curves = dict(next(iter(run['rotation_curves'].values())))
    steps = curves.pop('steps')
    lx.plot_layer_rotation_curves(curves, steps=steps, ax=ax,
                                  title=run['label'])
    ax.title.set_fontsize('x-small')
  for ax in list(axes.flat)[len(runs):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=None,
                      help='steps per run (default 3000; 400 with --quick)')
  parser.add_argument('--seeds', type=int, default=None,
                      help='seeds per recipe (default 3; 2 with --quick)')
  parser.add_argument('--width', type=int, default=256, help='hidden width')
  parser.add_argument('--activation', default='relu',
                      help="hidden activation, a flax.linen function name "
                           "(default 'relu')")
  parser.add_argument('--batch', type=int, default=64, help='batch size')
  parser.add_argument('--noise', type=float, default=1.0,
                      help='std of the Gaussian noise added to the '
                           '(standardised) inputs at every step')
  parser.add_argument('--out', default='.', help='output folder')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny version for tests: 400 steps, 3 recipes')
  parser.add_argument('--quiet', action='store_true',
                      help='print only the table')
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 400 if args.quick else 3000
  if args.seeds is None:
    args.seeds = 2 if args.quick else 3
  Path(args.out).mkdir(parents=True, exist_ok=True)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  recipes = RECIPES[::2] if args.quick else RECIPES
  if args.quick:  # Faster relaxation, so that 400 steps reach equilibrium.
    recipes = tuple(r._replace(weight_decay=5 * r.weight_decay)
                    for r in recipes)
  x, y = load_digits()
  model = MLP(width=args.width, activation=args.activation)
  paths = layer_paths(model.init(jax.random.PRNGKey(0), x[:1])['params'])
  seeds = list(range(args.seeds))
  window = slice(2 * args.steps // 3, None)
  runs, trainers = [], {}
  for recipe in recipes:
    start = time.perf_counter()
    if recipe.optimizer not in trainers:
      trainers[recipe.optimizer] = make_train(
          model, recipe.optimizer, x, y, paths, steps=args.steps,
          batch=args.batch,
          record_every=max(args.steps // 100, 1), noise=args.noise)
    out = trainers[recipe.optimizer](recipe.learning_rate, recipe.weight_decay,
                                     recipe.hyper, jnp.asarray(seeds))
    run = summarise(recipe, *out, paths, window, seeds)
    run['seconds'] = time.perf_counter() - start
    runs.append(run)
    if not args.quiet:
      print(f"{recipe.label}: {run['seconds']:.1f} s, train accuracy "
            f"{np.mean(run['train_accuracy_per_seed']):.3f}", flush=True)
  disagreements = [(run['label'], path, run['layers'][path]['ratio'])
                   for run in runs for path in paths
                   if abs(run['layers'][path]['ratio'] - 1) > TOLERANCE]
  out = Path(args.out)
  figures = [plot(runs, paths, args.steps, out / 'equilibrium_angles.png'),
             plot_rotation(runs, out / 'equilibrium_rotation.png')]
  result = {'args': vars(args), 'layers': paths, 'tolerance': TOLERANCE,
            'window': [window.start, args.steps], 'runs': runs,
            'disagreements': disagreements}
  json_path = out / 'equilibrium.json'
  _report.write_json(json_path, result)
  print(table(runs, paths))
  print(f'* = measured/predicted off by more than {TOLERANCE:.0%}; angles in '
        f'radians per step, mean over steps {window.start}-{args.steps} and '
        f'{args.seeds} seeds (+- std over seeds)')
  print(f'wrote {json_path}, ' + ', '.join(str(f) for f in figures))
  return result


if __name__ == '__main__':
  sys.exit(main() and None)
