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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # pylint: disable=g-import-not-at-top,wrong-import-position
import _study  # pylint: disable=g-import-not-at-top,wrong-import-position

import layca_jax as lx  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: Sequence[str] | None = None) -> dict:
  return _study.rate_sweep(
      __doc__.split('\n')[0], argv, make_tx=lx.layca_sgd, hyper='rate',
      name='Layca-SGD', stem='layca_rates', title='SGD + Layca at rates',
      xlabel='Layca rate', default_powers=list(range(1, 6)),
      quick_powers=[1, 4],
      extra_checks=lambda runs: {
          'every layer keeps its initial norm under Layca':
              _report.norms_held(runs)})


if __name__ == '__main__':
  main()
