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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _common.study_parser(__doc__.split('\n')[0], epochs=30,
                                quick_epochs=2)
  parser.add_argument('--powers', type=int, nargs='+', default=None,
                      help='sweep the rates 3^-k for these k (default '
                           '0..4; [0, 4] with --quick)')
  args = _common.parse_study_args(parser, argv)
  return _common.rate_sweep(
      args, make_tx=_common.sgd, hyper='learning_rate', name='SGD lr',
      stem='sgd_lr', title='Plain SGD at learning rates',
      xlabel='SGD learning rate', default_powers=list(range(5)),
      quick_powers=[0, 4])


if __name__ == '__main__':
  main()
