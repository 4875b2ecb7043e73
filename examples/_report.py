"""What a study reports: the checks of the paper's claims, the JSON, the
printed table, and the figures (curves drawn by
``lx.plot_layer_rotation_curves``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

import layca_jax as lx

from _train import Run  # pylint: disable=g-bad-import-order


# ---------------------------------------------------------------------------
# Checks.


def mean_rotation(run: Run) -> float:
  """The mean over layers of the final cosine distance."""
  return float(np.mean(list(run.final_rotation.values())))


def increasing(values: Sequence[float]) -> bool:
  """Strictly increasing."""
  return bool(np.all(np.diff(np.asarray(values, np.float64)) > 0))


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation (ties broken by order)."""
  ranks = lambda v: np.argsort(np.argsort(np.asarray(v, np.float64)))
  return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def norms_held(runs: Sequence[Run], tolerance: float = 1e-3) -> bool:
  """Every layer of every run ends on its initial norm (Layca's step 4)."""
  return all(abs(r - 1.0) < tolerance
             for run in runs for r in run.norm_ratio().values())


def rate_label(rate: float) -> str:
  """``3^-2`` for powers of three, else the number."""
  if rate > 0:
    power = math.log(rate, 3)
    if abs(power - round(power)) < 1e-9:
      return f'3^{round(power)}'
  return f'{rate:g}'


# ---------------------------------------------------------------------------
# JSON and the printed report.


def to_jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
  Path(path).write_text(json.dumps(to_jsonable(obj), indent=1) + '\n')


def report(result: dict[str, Any], json_path: Path,
           figures: Sequence[Path]) -> None:
  """Print a study's table of runs and where its outputs went."""
  print(f"{'run':<28} {'test acc':>8} {'mean rot.':>9}  final rotation per layer")
  for run in result['runs']:
    rotations = ' '.join(f'{v:.3f}' for v in run['final_rotation'].values())
    print(f"{run['name']:<28} {run['test_acc']:>8.3f} "
          f"{run['mean_final_rotation']:>9.3f}  {rotations}")
  for claim, holds in result['checks'].items():
    print(f"[{'agrees' if holds else 'DISAGREES'}] {claim}")
  print(f'wrote {json_path} and ' + ', '.join(str(f) for f in figures))


# ---------------------------------------------------------------------------
# Figures.


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
  """Lays out, writes (PNG, 110 dpi) and closes ``fig``."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return Path(path)


def plot_runs(runs: Sequence[Run], path: str | os.PathLike, *,
              ncols: int | None = None, title: str | None = None) -> Path:
  """Layer-rotation curves of each run side by side (paper style), x = epoch."""
  plt = pyplot()
  ncols = ncols or len(runs)
  nrows = math.ceil(len(runs) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows),
                           squeeze=False, sharey=True)
  for ax, run in zip(axes.flat, runs):
    lx.plot_layer_rotation_curves(
        run.history, steps=run.epochs, ax=ax, xlabel='Epoch',
        title=f'{run.name}\ntest acc {run.test_acc:.1%}')
  for ax in list(axes.flat)[len(runs):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return save_figure(fig, path)


def plot_accuracy_vs_rotation(runs: Sequence[Run], path: str | os.PathLike, *,
                              xlabel: str, xs: Sequence[float],
                              log_x: bool = False,
                              title: str | None = None) -> Path:
  """Test accuracy and mean final rotation against a swept hyperparameter."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot(xs, [r.test_acc for r in runs], 'o-', color='C0')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('Test accuracy', color='C0')
  if log_x:
    ax.set_xscale('log', base=3)
  twin = ax.twinx()
  twin.plot(xs, [mean_rotation(r) for r in runs], 's--', color='C1')
  twin.set_ylabel('Mean final cosine distance', color='C1')
  if title:
    ax.set_title(title)
  return save_figure(fig, path)
