"""Study 7 (paper Section 6): what layer rotation does to learned features.

A 1-hidden-layer MLP on scikit-learn's 8x8 digits, trained with SGD + Layca
at a low and a high rate. The input weights of 5 random hidden units are
shown as 8x8 images at initialisation, after low and after high rotation.
The paper's reading: rotation does not change *which* features a unit
learns, only *how far* it learns them (low rotation leaves them close to the
random initialisation).

    python examples/study_mlp_features.py --out runs/mlp_features
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # pylint: disable=g-import-not-at-top,wrong-import-position
import _models  # pylint: disable=g-import-not-at-top,wrong-import-position
import _report  # pylint: disable=g-import-not-at-top,wrong-import-position
import _study  # pylint: disable=g-import-not-at-top,wrong-import-position
import _train  # pylint: disable=g-import-not-at-top,wrong-import-position

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position


def hidden_kernel(params) -> np.ndarray:
  return np.asarray(params['Dense_0']['kernel'], np.float64)  # (64, hidden)


def unit_rotation(run: _train.Run) -> np.ndarray:
  """Per-hidden-unit cosine distance from init (``per_neuron=True``)."""
  rotation = lx.layer_rotation(run.state.params, run.init_params,
                               per_neuron=True)
  return np.asarray(rotation['Dense_0']['kernel'])


def displacement_cosines(low: _train.Run, high: _train.Run,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Cosine between each unit's move (final - init) at the two rates, for the
  same unit and for a random other unit (the baseline)."""
  w0 = hidden_kernel(low.init_params)
  d_low = hidden_kernel(low.state.params) - w0
  d_high = hidden_kernel(high.state.params) - w0
  unit = lambda d: d / np.linalg.norm(d, axis=0, keepdims=True)
  same = np.sum(unit(d_low) * unit(d_high), axis=0)
  n = d_low.shape[1]
  other = (np.arange(n) + np.random.default_rng(seed).integers(1, n, n)) % n
  return same, np.sum(unit(d_low) * unit(d_high)[:, other], axis=0)


def plot_features(runs: Sequence[_train.Run], units: np.ndarray,
                  path: Path) -> Path:
  plt = _report.pyplot()
  rows = [('init', hidden_kernel(runs[0].init_params), None)] + [
      (run.name, hidden_kernel(run.state.params), unit_rotation(run))
      for run in runs]
  fig, axes = plt.subplots(len(rows), len(units),
                           figsize=(1.6 * len(units), 1.8 * len(rows)),
                           squeeze=False)
  for r, (label, kernel, rotation) in enumerate(rows):
    for c, u in enumerate(units):
      ax = axes[r, c]
      image = kernel[:, u].reshape(8, 8)
      limit = np.abs(image).max()
      ax.imshow(image, cmap='RdBu_r', vmin=-limit, vmax=limit)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f'unit {u}' if rotation is None
                   else f'cos dist {rotation[u]:.2f}', fontsize=8)
    axes[r, 0].set_ylabel(label, fontsize=8)
  fig.suptitle('Input weights of 5 random hidden units')
  return _report.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _study.study_parser(__doc__.split('\n')[0], epochs=50,
                                quick_epochs=3)
  parser.add_argument('--low-rate', type=float, default=3.0 ** -7)
  parser.add_argument('--high-rate', type=float, default=3.0 ** -2)
  parser.add_argument('--hidden', type=int, default=128)
  args = _study.parse_study_args(parser, argv)
  data = _data.digits(seed=args.seed)
  model = _models.MLP(hidden=args.hidden)
  total_steps = args.epochs * (data.x.shape[0] // 64)
  factory = optax.inject_hyperparams(
      lambda rate: lx.layca_sgd(_train.step_decay(rate, total_steps)))
  runs = [
      _train.train(model, factory(rate=rate), data, batch_size=64,
                   hyper={'rate': rate}, share_compilation='mlp_features',
                   **_study.run_options(
                       args, f'Layca {_report.rate_label(rate)}'))
      for rate in (args.low_rate, args.high_rate)]
  low, high = runs
  units = np.sort(np.random.default_rng(args.seed).choice(
      args.hidden, 5, replace=False))
  same, other = displacement_cosines(low, high, args.seed)
  rotation = {r.name: unit_rotation(r) for r in runs}
  checks = {
      'the high rate rotates the hidden units further':
          bool(np.median(rotation[high.name]) > np.median(rotation[low.name])),
      'each unit moves the same way at both rates (same-unit cosine of '
      'the moves above the other-unit baseline)':
          bool(same.mean() > other.mean() + 0.1),
      'larger rotation gives better test accuracy':
          high.test_acc > low.test_acc,
  }
  out = Path(args.out)
  figures = [plot_features(runs, units, out / 'mlp_features.png'),
             _report.plot_runs(runs, out / 'mlp_features_curves.png',
                               title='1-hidden-layer MLP on the digits')]
  result = _study.finish_study(
      args, runs, checks, 'mlp_features', figures, units=units,
      unit_rotation={k: v[units] for k, v in rotation.items()},
      median_unit_rotation={k: float(np.median(v))
                            for k, v in rotation.items()},
      same_unit_move_cosine=float(same.mean()),
      other_unit_move_cosine=float(other.mean()))
  print(f'mean cosine of the moves: same unit {same.mean():.3f}, '
        f'other unit {other.mean():.3f}')
  return result


if __name__ == '__main__':
  main()
