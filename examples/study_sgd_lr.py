"""Study 3 (paper Fig. 2): plain SGD learning-rate sweep on MNIST-1D.

The paper reads the effect of SGD's learning rate through layer rotation:
higher rates rotate the layers further, and larger rotations go with better
test accuracy.

    python examples/study_sgd_lr.py --out runs/sgd_lr
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _common.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--powers', type=int, nargs='+', default=None,
                      help='sweep the rates 3^-k for these k (default '
                           '(5); [0, 4] with --quick)')
  args = _common.parse_study_args(parser, argv)
  data = _common.mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  powers = args.powers or ([0, 4] if args.quick else list(range(5)))
  rates = [3.0 ** -k for k in powers]
  factory = optax.inject_hyperparams(
      lambda learning_rate: _common.sgd(
          _common.step_decay(learning_rate, total_steps)))
  runs = [
      _common.train(_common.ConvNet(), factory(learning_rate=lr), data,
                    epochs=args.epochs, seed=args.seed, quiet=args.quiet,
                    name=f'SGD lr {_common.rate_label(lr)}',
                    hyper={'learning_rate': lr}, share_compilation='sgd_lr')
      for lr in rates]
  by_lr = sorted(runs, key=lambda r: r.hyper['learning_rate'])
  rotation = [_common.mean_rotation(r) for r in by_lr]
  accuracy = [r.test_acc for r in by_lr]
  checks = {
      'the final layer rotation grows with the learning rate':
          _common.increasing(rotation),
      'larger final rotations go with better test accuracy '
      '(rank correlation > 0)':
          _common.rank_correlation(rotation, accuracy) > 0,
  }
  out = Path(args.out)
  figures = [
      _common.plot_runs(runs, out / 'sgd_lr_curves.png',
                        title='Plain SGD at learning rates '
                              + ', '.join(_common.rate_label(r) for r in rates)
                              + ' (step decays at 50% and 75%)'),
      _common.plot_accuracy_vs_rotation(
          by_lr, out / 'sgd_lr_accuracy.png', xlabel='SGD learning rate',
          xs=[r.hyper['learning_rate'] for r in by_lr], log_x=True),
  ]
  result = _common.study_result(
      args, runs, checks,
      rank_correlation=_common.rank_correlation(rotation, accuracy))
  _common.write_json(out / 'sgd_lr.json', result)
  _common.report(result, out / 'sgd_lr.json', figures)
  return result


if __name__ == '__main__':
  main()
