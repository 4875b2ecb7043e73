"""Study 5 (paper Fig. 4): a high learning rate with and without warm-up.

The paper reads learning-rate warm-ups through layer rotation: at a high
learning rate, the first steps of plain SGD rotate the layers abruptly; a
warm-up spreads that rotation out and trains better, while Layca, which
fixes the rotation per step, needs no warm-up.

    python examples/study_warmup.py --out runs/warmup
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


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _study.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--lr', type=float, default=3.0,
                      help='the high SGD learning rate (default 3)')
  parser.add_argument('--warmup-epochs', type=int, default=None,
                      help='linear warm-up length (default 5; 1 with --quick)')
  parser.add_argument('--layca-rate', type=float, default=3.0 ** -1,
                      help='Layca rate, no warm-up (default 3^-1)')
  args = _study.parse_study_args(parser, argv)
  if args.warmup_epochs is None:
    args.warmup_epochs = 1 if args.quick else 5
  data = _data.mnist1d(num_samples=1000 if args.quick else 5000)
  steps_per_epoch = data.x.shape[0] // 128
  total_steps = args.epochs * steps_per_epoch
  warmup_steps = args.warmup_epochs * steps_per_epoch
  factory = optax.inject_hyperparams(
      lambda learning_rate, warmup_steps: _train.sgd(
          _train.step_decay(learning_rate, total_steps, warmup_steps)))
  runs = [
      _train.train(_models.ConvNet(),
                   factory(learning_rate=args.lr, warmup_steps=w), data,
                   hyper={'learning_rate': args.lr, 'warmup_steps': w},
                   share_compilation='warmup', **_study.run_options(
                       args, f'SGD lr {args.lr:g}, warm-up '
                             f'{w // steps_per_epoch} ep'))
      for w in (0, warmup_steps)]
  if not args.quick:
    runs.append(_train.train(
        _models.ConvNet(),
        lx.layca_sgd(_train.step_decay(args.layca_rate, total_steps)), data,
        hyper={'rate': args.layca_rate, 'warmup_steps': 0},
        **_study.run_options(args, f'Layca-SGD '
                             f'{_report.rate_label(args.layca_rate)}, '
                             f'no warm-up')))
  without, with_warmup = runs[:2]

  def rotation_at(run, epoch):
    index = int(np.argmin(np.abs(run.epochs - epoch)))
    return float(np.mean([c[index] for c in run.curves.values()]))

  early = {r.name: rotation_at(r, args.warmup_epochs) for r in runs}
  checks = {
      'without warm-up the layers rotate further during the warm-up period':
          early[without.name] > early[with_warmup.name],
      'warm-up improves test accuracy at this high learning rate':
          with_warmup.test_acc > without.test_acc,
  }
  if not args.quick:
    checks['Layca without warm-up does at least as well as SGD with warm-up '
           '(within 1 point)'] = runs[2].test_acc >= with_warmup.test_acc - 0.01
  out = Path(args.out)
  figures = [_report.plot_runs(runs, out / 'warmup_curves.png',
                               title=f'High learning rate, with and without '
                                     f'a {args.warmup_epochs}-epoch warm-up')]
  return _study.finish_study(args, runs, checks, 'warmup', figures,
                              rotation_at_end_of_warmup=early)


if __name__ == '__main__':
  main()
