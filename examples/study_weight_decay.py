"""Study 4 (paper Fig. 3): plain SGD with and without weight decay.

With BatchNorm a layer's output does not depend on its weights' norm, so
weight decay, by shrinking the norm, makes every step rotate the layer
further. The paper finds that weight decay increases layer rotation and,
with it, test accuracy.

    python examples/study_weight_decay.py --out runs/weight_decay
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # pylint: disable=g-import-not-at-top,wrong-import-position
import _models  # pylint: disable=g-import-not-at-top,wrong-import-position
import _report  # pylint: disable=g-import-not-at-top,wrong-import-position
import _study  # pylint: disable=g-import-not-at-top,wrong-import-position
import _train  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _study.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--weight-decay', type=float, default=5e-3,
                      help='L2 coefficient on the kernels (default 5e-3)')
  args = _study.parse_study_args(parser, argv)
  data = _data.mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  rates = [3.0 ** -2] if args.quick else [3.0 ** -1, 3.0 ** -3]
  factory = optax.inject_hyperparams(
      lambda learning_rate, weight_decay: _train.sgd(
          _train.step_decay(learning_rate, total_steps), weight_decay))
  runs = [
      _train.train(_models.ConvNet(),
                   factory(learning_rate=lr, weight_decay=wd), data,
                   hyper={'learning_rate': lr, 'weight_decay': wd},
                   share_compilation='weight_decay', **_study.run_options(
                       args, f'SGD lr {_report.rate_label(lr)}, wd {wd:g}'))
      for lr in rates for wd in (0.0, args.weight_decay)]
  pairs = list(zip(runs[::2], runs[1::2]))  # (without, with) per rate
  checks = {
      'weight decay increases the final layer rotation':
          all(_report.mean_rotation(w) > _report.mean_rotation(wo)
              for wo, w in pairs),
      'weight decay improves test accuracy':
          all(w.test_acc > wo.test_acc for wo, w in pairs),
  }
  out = Path(args.out)
  figures = [_report.plot_runs(runs, out / 'weight_decay_curves.png', ncols=2,
                               title='Plain SGD without / with weight decay')]
  return _study.finish_study(args, runs, checks, 'weight_decay', figures)


if __name__ == '__main__':
  main()
