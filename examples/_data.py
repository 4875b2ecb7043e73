"""The studies' data, generated or shipped locally (never downloaded).

MNIST-1D comes from ``mnist1d.data.make_dataset`` (never ``get_dataset``,
which downloads); the 8x8 digits ship with scikit-learn.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Train and test arrays (float32 inputs, int32 labels)."""

  x: np.ndarray
  y: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
  """MNIST-1D generated locally (4000 train / 1000 test at the defaults).

  Inputs are shaped ``(n, 40, 1)`` (length, channels) for 1-D convolutions.
  ``seed`` is the generator's: 42 gives the published dataset.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  data = make_dataset(args)
  as_x = lambda a: np.asarray(a, np.float32)[..., None]
  return Dataset(as_x(data['x']), np.asarray(data['y'], np.int32),
                 as_x(data['x_test']), np.asarray(data['y_test'], np.int32),
                 'MNIST-1D')


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits (1797 images), pixels scaled to ``[0, 1]``."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  x = (x[order] / 16.0).astype(np.float32)
  y = y[order].astype(np.int32)
  n_test = int(round(test_fraction * len(y)))
  return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 'digits')
