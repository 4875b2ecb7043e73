"""Shared fixtures: a Flax-like parameter pytree with conv, dense, bias and batch-norm leaves."""

import numpy as np
import pytest



def flax_like_params(seed: int = 0, dtype=np.float32) -> dict:
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(dtype)
  return {
      'Conv_0': {'kernel': normal(3, 3, 2, 4), 'bias': normal(4) * 0.1},
      'BatchNorm_0': {'scale': 1 + normal(4) * 0.1, 'bias': normal(4) * 0.1},
      'Conv_1': {'kernel': normal(3, 3, 4, 8), 'bias': normal(8) * 0.1},
      'Dense_0': {'kernel': normal(72, 10), 'bias': normal(10) * 0.1},
  }


def flat_paths(tree: dict) -> dict:
  """{'Conv_0/kernel': leaf, ...} for a two-level dict."""
  return {f'{a}/{b}': v for a, sub in tree.items() for b, v in sub.items()}


def nest(flat: dict) -> dict:
  out = {}
  for path, v in flat.items():
    a, b = path.split('/')
    out.setdefault(a, {})[b] = v
  return out


@pytest.fixture
def params():
  return flax_like_params()
