"""The shape every study shares: its command line, how a run takes it, and
how a study ends (JSON, printed report); plus the rate sweep of studies 1
and 3.

Every study takes ``--epochs --seed --out --quick --quiet`` and, to be
interrupted and resumed, ``--checkpoints --resume --stop-after``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

import optax

import _data  # pylint: disable=g-bad-import-order
import _models
import _report
import _train


def study_parser(description: str, *, epochs: int,
                 quick_epochs: int) -> argparse.ArgumentParser:
  """The flags every study shares."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--epochs', type=int, default=None,
                      help=f'epochs per run (default {epochs}; '
                           f'{quick_epochs} with --quick)')
  parser.add_argument('--seed', type=int, default=0,
                      help='initialisation and batch-order seed')
  parser.add_argument('--out', default='.', help='output folder')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny version for tests: fewer epochs and runs')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  parser.add_argument('--checkpoints', action='store_true',
                      help='checkpoint every run every epoch (orbax) under '
                           'OUT/checkpoints')
  parser.add_argument('--resume', action='store_true',
                      help='continue each run from its latest checkpoint '
                           '(implies --checkpoints)')
  parser.add_argument('--stop-after', type=int, default=None,
                      help='stop each run after this many epochs, as an '
                           'interruption would (then rerun with --resume)')
  parser.set_defaults(_epochs=(epochs, quick_epochs))
  return parser


def parse_study_args(parser: argparse.ArgumentParser,
                     argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = parser.parse_args(argv)
  full, quick = args._epochs  # pylint: disable=protected-access
  del args._epochs
  if args.epochs is None:
    args.epochs = quick if args.quick else full
  Path(args.out).mkdir(parents=True, exist_ok=True)
  return args


def run_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
  """The keyword arguments of ``_train.train`` that come from the flags."""
  checkpointed = args.checkpoints or args.resume
  return dict(epochs=args.epochs, seed=args.seed, quiet=args.quiet, name=name,
              checkpoints=(_train.checkpoint_dir(args.out, name)
                           if checkpointed else None),
              resume=args.resume, stop_after=args.stop_after)


def finish_study(args: argparse.Namespace, runs: Sequence[_train.Run],
                 checks: dict[str, bool], stem: str, figures: Sequence[Path],
                 **extra: Any) -> dict[str, Any]:
  """Writes a study's JSON (``{stem}.json`` under ``args.out``: the command's
  arguments, every run, the paper's claims as checked on these runs
  (``checks``: claim -> holds) and ``extra``), prints its report, returns it."""
  result = {'args': vars(args), 'runs': [r.summary() for r in runs],
            'checks': checks, **extra}
  json_path = Path(args.out) / f'{stem}.json'
  _report.write_json(json_path, result)
  _report.report(result, json_path, figures)
  return result


def rate_sweep(description: str, argv: Sequence[str] | None, *,
               make_tx: Callable[[Any], Any], hyper: str, name: str, stem: str,
               title: str, xlabel: str, default_powers: Sequence[int],
               quick_powers: Sequence[int],
               extra_checks: Callable[[Sequence[_train.Run]], dict] = (
                   lambda _: {}),
               ) -> dict[str, Any]:
  """Trains the ConvNet on MNIST-1D at rates ``3^-k``; rotation vs accuracy.

  The whole of the Layca-rate (Fig. 1) and SGD-learning-rate (Fig. 2)
  studies, command line included (the study flags and ``--powers``):
  ``make_tx(schedule)`` builds the optimizer for one rate (step decays at
  50% and 75%), compiled once for the sweep through
  ``optax.inject_hyperparams``; ``hyper`` names the rate in the results.
  Writes ``{stem}.json``, ``{stem}_curves.png`` and ``{stem}_accuracy.png``
  under ``--out``.
  """
  parser = study_parser(description, epochs=30, quick_epochs=2)
  parser.add_argument('--powers', type=int, nargs='+', default=None,
                      help=f'sweep the rates 3^-k for these k (default '
                           f'{list(default_powers)}; {list(quick_powers)} '
                           f'with --quick)')
  args = parse_study_args(parser, argv)
  data = _data.mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  powers = args.powers or (quick_powers if args.quick else default_powers)
  rates = [3.0 ** -k for k in powers]
  factory = optax.inject_hyperparams(
      lambda rate: make_tx(_train.step_decay(rate, total_steps)))
  runs = [
      _train.train(_models.ConvNet(), factory(rate=rate), data,
                   hyper={hyper: rate}, share_compilation=stem,
                   **run_options(args, f'{name} {_report.rate_label(rate)}'))
      for rate in rates]
  ordered = sorted(runs, key=lambda r: r.hyper[hyper])
  rotation = [_report.mean_rotation(r) for r in ordered]
  accuracy = [r.test_acc for r in ordered]
  correlation = _report.rank_correlation(rotation, accuracy)
  checks = {
      **extra_checks(runs),
      f'the final layer rotation grows with the {xlabel}':
          _report.increasing(rotation),
      'larger final rotations go with better test accuracy '
      '(rank correlation > 0)': correlation > 0,
  }
  out = Path(args.out)
  figures = [
      _report.plot_runs(
          runs, out / f'{stem}_curves.png',
          title=f'{title} ' + ', '.join(_report.rate_label(r) for r in rates)
          + ' (step decays at 50% and 75%)'),
      _report.plot_accuracy_vs_rotation(
          ordered, out / f'{stem}_accuracy.png', xlabel=xlabel,
          xs=[r.hyper[hyper] for r in ordered], log_x=True),
  ]
  return finish_study(args, runs, checks, stem, figures,
                      rank_correlation=correlation)
