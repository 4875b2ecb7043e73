"""Quickstart: layer rotation of a small CNN with plain SGD and with Layca.

Generates MNIST-1D locally, trains a 3-conv BatchNorm CNN twice (plain SGD,
then ``lx.layca_sgd``) with ``lx.track_rotation`` recording each layer's
rotation in-graph, prints a per-layer rotation table and both test
accuracies, and writes ``layer_rotation_curves.png``.

    python examples/quickstart.py                  # about a minute on 2 CPU cores
    python examples/quickstart.py --epochs 60 --layca-rate 0.111
    python examples/quickstart.py --out runs/a     # checkpoints every epoch...
    python examples/quickstart.py --out runs/a --resume   # ...and resumes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=None,
                      help='epochs per run (default 20; 2 with --quick)')
  parser.add_argument('--sgd-lr', type=float, default=3.0 ** -3,
                      help='plain SGD initial learning rate (default 3^-3)')
  parser.add_argument('--layca-rate', type=float, default=3.0 ** -2,
                      help='Layca initial rotation rate rho (default 3^-2)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='.',
                      help='output folder (figure, results, checkpoints)')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny run (1000 examples, 2 epochs) for tests')
  parser.add_argument('--resume', action='store_true',
                      help='continue from the latest checkpoint in --out')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  parser.add_argument('--stop-after', type=int, default=None,
                      help='stop each run after this many epochs, as an '
                           'interruption would (then rerun with --resume)')
  args = parser.parse_args(argv)
  if args.epochs is None:
    args.epochs = 2 if args.quick else 20
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  data = _common.mnist1d(num_samples=1000 if args.quick else 5000)
  model = _common.ConvNet()
  total_steps = args.epochs * (data.x.shape[0] // 128)
  # Both with the paper's step decays (/5 at 50% and 75% of training): at a
  # constant rate Layca keeps turning every layer and never settles.
  runs = []
  for name, tx in [
      (f'SGD, lr {_common.rate_label(args.sgd_lr)}',
       optax.sgd(_common.step_decay(args.sgd_lr, total_steps))),
      (f'Layca-SGD, rate {_common.rate_label(args.layca_rate)}',
       lx.layca_sgd(_common.step_decay(args.layca_rate, total_steps))),
  ]:
    runs.append(_common.train(
        model, tx, data, epochs=args.epochs, seed=args.seed, name=name,
        quiet=args.quiet, resume=args.resume, stop_after=args.stop_after,
        checkpoint_dir=out / 'checkpoints' / name.split(',')[0]))

  for run in runs:
    rotation = lx.layer_rotation(run.state.params, run.init_params)
    print(f'\n{run.name}: test accuracy {run.test_acc:.1%} '
          f'after {int(run.state.epoch)} epochs')
    print(lx.rotation_table(rotation, run.state.params, order=run.order))

  figure = _common.plot_runs(runs, out / 'layer_rotation_curves.png',
                             title=f'{data.name}, 3-conv BatchNorm CNN, '
                                   f'seed {args.seed}')
  result = {'args': vars(args), 'runs': [r.summary() for r in runs]}
  _common.write_json(out / 'quickstart.json', result)
  print(f'\nwrote {figure} and {out / "quickstart.json"}')
  return result


if __name__ == '__main__':
  main()
