"""Study 2 (paper Section 4): layer-wise rotation configurations (alpha).

``lx.alpha_multipliers`` gives the paper's one-parameter family of layer-wise
rates: alpha > 0 slows the early layers, alpha < 0 the late ones, alpha = 0
rotates every layer alike. The paper finds alpha = 0 (every layer reaching a
large rotation) generalises best.

    python examples/study_alpha.py --out runs/alpha
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # pylint: disable=g-import-not-at-top,wrong-import-position
import _models  # pylint: disable=g-import-not-at-top,wrong-import-position
import _report  # pylint: disable=g-import-not-at-top,wrong-import-position
import _study  # pylint: disable=g-import-not-at-top,wrong-import-position
import _train  # pylint: disable=g-import-not-at-top,wrong-import-position

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _study.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--rate', type=float, default=3.0 ** -2,
                      help='Layca rate of the fastest layer (default 3^-2)')
  args = _study.parse_study_args(parser, argv)
  data = _data.mnist1d(num_samples=1000 if args.quick else 5000)
  model = _models.ConvNet()
  variables = _train.init_variables(model, data.x, args.seed)
  params, _ = _train.split_variables(variables)
  order = _train.forward_order(model, variables, data.x)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  alphas = [0.0, 0.8] if args.quick else [-0.8, -0.4, 0.0, 0.4, 0.8]
  runs = []
  for alpha in alphas:
    multipliers = lx.alpha_multipliers(params, alpha, order)
    tx = lx.layca_sgd(_train.step_decay(args.rate, total_steps),
                      multipliers=multipliers)
    runs.append(_train.train(
        model, tx, data, **_study.run_options(args, f'alpha {alpha:+.1f}'),
        hyper={'alpha': alpha, 'rate': args.rate,
               'multipliers': lx.flatten_rotations(multipliers, order)}))
  first, last = order[0], order[-1]
  slope = {r.hyper['alpha']: r.final_rotation[last] - r.final_rotation[first]
           for r in runs}
  best = max(runs, key=lambda r: r.test_acc)
  checks = {
      'every layer keeps its initial norm under Layca':
          _report.norms_held(runs),
      'alpha > 0 leaves the input layer less rotated than the last layer':
          all(s > 0 for a, s in slope.items() if a > 0),
      'alpha < 0 leaves the last layer less rotated than the input layer':
          all(s < 0 for a, s in slope.items() if a < 0),
      'alpha = 0 (every layer rotating alike) gives the best test accuracy':
          best.hyper['alpha'] == 0.0,
  }
  out = Path(args.out)
  figures = [
      _report.plot_runs(runs, out / 'alpha_curves.png',
                        title=f'SGD + Layca, rate {_report.rate_label(args.rate)}'
                              f' x alpha multipliers'),
      _report.plot_accuracy_vs_rotation(
          runs, out / 'alpha_accuracy.png', xlabel='alpha',
          xs=[r.hyper['alpha'] for r in runs]),
  ]
  return _study.finish_study(args, runs, checks, 'alpha', figures,
                             order=order)


if __name__ == '__main__':
  main()
