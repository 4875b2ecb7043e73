"""Study 1 (paper Fig. 1): SGD + Layca at rates 3^-1 ... 3^-5 on MNIST-1D.

Layca sets every layer's rotation rate, so the rate alone decides how far the
layers rotate; the paper finds that the larger the final rotations, the
better the test accuracy (best when layers reach a cosine distance near 1).

    python examples/study_layca_rates.py --out runs/rates
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _common.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--powers', type=int, nargs='+', default=None,
                      help='sweep the rates 3^-k for these k (default '
                           '(1..6); [1, 4] with --quick)')
  args = _common.parse_study_args(parser, argv)
  data = _common.mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  powers = args.powers or ([1, 4] if args.quick else list(range(1, 6)))
  rates = [3.0 ** -k for k in powers]
  factory = optax.inject_hyperparams(
      lambda rate: lx.layca_sgd(_common.step_decay(rate, total_steps)))
  runs = [
      _common.train(_common.ConvNet(), factory(rate=rate), data,
                    epochs=args.epochs, seed=args.seed, quiet=args.quiet,
                    name=f'Layca-SGD {_common.rate_label(rate)}',
                    hyper={'rate': rate}, share_compilation='layca_rates')
      for rate in rates]
  by_rate = sorted(runs, key=lambda r: r.hyper['rate'])
  rotation = [_common.mean_rotation(r) for r in by_rate]
  accuracy = [r.test_acc for r in by_rate]
  checks = {
      'every layer keeps its initial norm under Layca':
          _common.norms_held(runs),
      'the final layer rotation grows with the Layca rate':
          _common.increasing(rotation),
      'larger final rotations go with better test accuracy '
      '(rank correlation > 0)':
          _common.rank_correlation(rotation, accuracy) > 0,
  }
  out = Path(args.out)
  figures = [
      _common.plot_runs(runs, out / 'layca_rates_curves.png',
                        title='SGD + Layca at rates '
                              + ', '.join(_common.rate_label(r) for r in rates)
                              + ' (step decays at 50% and 75%)'),
      _common.plot_accuracy_vs_rotation(
          by_rate, out / 'layca_rates_accuracy.png', xlabel='Layca rate',
          xs=[r.hyper['rate'] for r in by_rate], log_x=True),
  ]
  result = _common.study_result(
      args, runs, checks,
      rank_correlation=_common.rank_correlation(rotation, accuracy))
  _common.write_json(out / 'layca_rates.json', result)
  _common.report(result, out / 'layca_rates.json', figures)
  return result


if __name__ == '__main__':
  main()
