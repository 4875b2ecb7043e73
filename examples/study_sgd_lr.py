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
import _study  # pylint: disable=g-import-not-at-top,wrong-import-position
import _train  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  return _study.rate_sweep(
      __doc__.split('\n')[0], argv, make_tx=_train.sgd,
      hyper='learning_rate', name='SGD lr', stem='sgd_lr',
      title='Plain SGD at learning rates', xlabel='SGD learning rate',
      default_powers=list(range(5)), quick_powers=[0, 4])


if __name__ == '__main__':
  main()
