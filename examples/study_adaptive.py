"""Study 6 (paper Fig. 6): RMSprop, Adam and Adagrad, with and without L2,
and with Layca (``lx.layca_rmsprop/adam/adagrad``).

The paper reads the poorer generalisation of adaptive methods through layer
rotation: on their own (with or without L2) they rotate the layers less or
unevenly; with Layca controlling the rotation they reach SGD-like accuracy.

    python examples/study_adaptive.py --out runs/adaptive
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

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position

# Base direction (optax defaults, as in lx.layca_*), its usual learning rate,
# and its Layca version.
METHODS = {
    'RMSprop': (optax.scale_by_rms, 1e-3, lx.layca_rmsprop),
    'Adam': (optax.scale_by_adam, 1e-3, lx.layca_adam),
    'Adagrad': (optax.scale_by_rss, 1e-2, lx.layca_adagrad),
}


def adaptive(direction, total_steps):
  """``direction`` with L2 on the kernels (added to the gradient, as in the
  paper's Keras regulariser) at a decayed learning rate."""
  return lambda learning_rate, l2: optax.chain(
      optax.add_decayed_weights(l2, _train.layers_mask),
      direction(),
      optax.scale_by_learning_rate(
          _train.step_decay(learning_rate, total_steps)))


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _study.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--l2', type=float, default=1e-3,
                      help='L2 coefficient on the kernels (default 1e-3)')
  parser.add_argument('--layca-rate', type=float, default=3.0 ** -3,
                      help='rate of the Layca versions (default 3^-3)')
  args = _study.parse_study_args(parser, argv)
  data = _data.mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  methods = ['Adam'] if args.quick else list(METHODS)
  train = lambda tx, name, **kw: _train.train(
      _models.ConvNet(), tx, data, **_study.run_options(args, name), **kw)
  groups = {}
  for method in methods:
    direction, lr, with_layca = METHODS[method]
    factory = optax.inject_hyperparams(adaptive(direction, total_steps))
    groups[method] = [
        train(factory(learning_rate=lr, l2=l2),
              f'{method} lr {lr:g}' + (f', L2 {l2:g}' if l2 else ''),
              hyper={'method': method, 'learning_rate': lr, 'l2': l2,
                     'layca': False},
              share_compilation=('adaptive', method))
        for l2 in (0.0, args.l2)]
    groups[method].append(train(
        with_layca(_train.step_decay(args.layca_rate, total_steps)),
        f'{method} + Layca {_report.rate_label(args.layca_rate)}',
        hyper={'method': method, 'rate': args.layca_rate, 'layca': True}))
  runs = [r for group in groups.values() for r in group]
  rot = _report.mean_rotation
  checks = {
      'Layca keeps every layer norm': _report.norms_held(
          [g[2] for g in groups.values()]),
      'L2 increases the layer rotation of adaptive methods':
          all(rot(g[1]) > rot(g[0]) for g in groups.values()),
      'Layca rotates the layers further than the adaptive method alone':
          all(rot(g[2]) > max(rot(g[0]), rot(g[1])) for g in groups.values()),
      'with Layca, adaptive methods reach better test accuracy than alone '
      '(with or without L2)':
          all(g[2].test_acc > max(g[0].test_acc, g[1].test_acc)
              for g in groups.values()),
  }
  out = Path(args.out)
  figures = [_report.plot_runs(runs, out / 'adaptive_curves.png', ncols=3,
                               title='Adaptive methods: alone, with L2, '
                                     'with Layca')]
  return _study.finish_study(args, runs, checks, 'adaptive', figures)


if __name__ == '__main__':
  main()
