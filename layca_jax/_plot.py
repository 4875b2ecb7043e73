"""Paper-style layer-rotation curves and a terminal summary table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from layca_jax._history import as_curves
from layca_jax._layers import PyTree
from layca_jax._order import ordered_leaves

# Above this many curves a depth colour bar replaces the legend.
_MAX_LEGEND_ENTRIES = 12


def _pyplot():
  try:
    import matplotlib.pyplot as plt  # Lazy: matplotlib is an optional extra.
  except ImportError as e:
    raise ImportError(
        "Plotting layer rotation needs matplotlib: pip install "
        "'layca-jax[plot]'") from e
  return plt


def plot_layer_rotation_curves(
    curves_or_history: Any,
    steps: Sequence[float] | None = None,
    ax: Any = None,
    xlabel: str = 'Step',
    title: str | None = None,
    *,
    legend: bool | None = None,
) -> Any:
  """Layer-rotation curves as in the paper: one line per layer, by depth.

  Lines are coloured with viridis by depth, the input layer first (dark
  purple) and the last layer at the yellow end; y is the cosine distance to
  the initial weights, on ``[0, max(1, largest value)]``.

  Args:
    curves_or_history: a :class:`RotationHistory`, the ``(steps, rotations)``
      pair of :func:`rotation_history`, or a mapping layer name -> sequence
      of values, in depth order (input layer first).
    steps: x values (step or epoch numbers); by default the history's steps,
      else ``0, 1, ...``.
    ax: a matplotlib Axes to draw on; a new figure by default.
    xlabel: x-axis label, e.g. ``'Epoch'``.
    title: optional title.
    legend: a legend of layer names (True) or a depth colour bar (False);
      by default a legend for at most 12 curves.

  Returns:
    The matplotlib Axes.

  Raises:
    ImportError: when matplotlib is missing (``pip install 'layca-jax[plot]'``).

  Example:
    >>> import matplotlib; matplotlib.use('Agg')
    >>> import layca_jax as lx
    >>> ax = lx.plot_layer_rotation_curves(
    ...     {'Conv_0/kernel': [0., .4, .7], 'Dense_0/kernel': [0., .2, .3]})
    >>> len(ax.lines), ax.get_ylabel(), tuple(map(float, ax.get_ylim()))
    (2, 'Cosine distance', (0.0, 1.0))
  """
  plt = _pyplot()
  curves, history_steps = as_curves(curves_or_history)
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  colours = plt.get_cmap('viridis')(np.linspace(0.0, 1.0, max(len(curves), 1)))
  top = 1.0
  for (name, values), colour in zip(curves.items(), colours):
    x = (np.asarray(steps) if steps is not None
         else history_steps if history_steps is not None
         else np.arange(len(values)))
    if len(x) != len(values):
      raise ValueError(
          f'Curve {name!r} has {len(values)} values but there are {len(x)} '
          f'steps.')
    ax.plot(x, values, color=colour, label=name)
    finite = values[np.isfinite(values)]
    if finite.size:
      top = max(top, float(finite.max()))
  ax.set_ylim(0.0, top)
  ax.set_xlabel(xlabel)
  ax.set_ylabel('Cosine distance')
  if title is not None:
    ax.set_title(title)
  if legend is None:
    legend = len(curves) <= _MAX_LEGEND_ENTRIES
  if legend and curves:
    ax.legend(fontsize='small')
  elif curves:
    mappable = plt.cm.ScalarMappable(
        cmap='viridis', norm=plt.Normalize(0, max(len(curves) - 1, 1)))
    bar = ax.figure.colorbar(mappable, ax=ax)
    bar.set_label('Layer depth (0 = input layer)')
  return ax


def rotation_table(rotations: PyTree, params: PyTree | None = None,
                   order: Sequence[str] | None = None) -> str:
  """A per-layer text table: path, shape, cosine distance, angle in degrees.

  Args:
    rotations: a pytree as from :func:`layer_rotation` or
      :func:`tracked_rotation`.
    params: the params, to show each layer's shape (else the shape of its
      rotation value, ``()`` for a whole layer).
    order: layer paths in depth order; ``None`` for a natural sort.

  Returns:
    The table as a string; a per-unit layer shows the mean over its units
    and their range.

  Example:
    >>> import jax.numpy as jnp
    >>> import layca_jax as lx
    >>> w0 = {'Dense_0': {'kernel': jnp.eye(2)}}
    >>> w = {'Dense_0': {'kernel': jnp.array([[1., 1.], [-1., 1.]])}}
    >>> print(lx.rotation_table(lx.layer_rotation(w, w0), w))
    layer           shape   cosine distance  angle (deg)
    Dense_0/kernel  (2, 2)           0.2929        45.00
  """
  shapes = {}
  if params is not None:
    import jax  # Local: keeps this module's import light.
    shapes = {path: np.shape(leaf) for path, leaf in ordered_leaves(
        jax.tree.map(lambda r, p: None if r is None else p, rotations, params,
                     is_leaf=lambda x: x is None), order)}
  rows = [('layer', 'shape', 'cosine distance', 'angle (deg)')]
  for path, value in ordered_leaves(rotations, order):
    distance = np.asarray(value, dtype=np.float64)
    angle = np.degrees(np.arccos(np.clip(1.0 - distance, -1.0, 1.0)))
    shape = shapes.get(path, distance.shape)
    if distance.ndim == 0:
      rows.append((path, str(tuple(shape)), f'{distance:.4f}', f'{angle:.2f}'))
    else:
      rows.append((path, str(tuple(shape)),
                   f'{np.mean(distance):.4f} [{np.min(distance):.4f}, '
                   f'{np.max(distance):.4f}]',
                   f'{np.mean(angle):.2f}'))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ['  '.join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                      row[2].rjust(widths[2]), row[3].rjust(widths[3])])
           for row in rows]
  return '\n'.join(line.rstrip() for line in lines)
