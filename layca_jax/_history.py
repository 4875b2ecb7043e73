"""Host-side recorder of layer-rotation curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from layca_jax._layers import PyTree
from layca_jax._order import flatten_rotations


class RotationHistory:
  """Records per-layer rotations over training, on the host.

  Each :meth:`record` flattens a rotation pytree with
  :func:`flatten_rotations` (per-unit leaves become ``'path/i'`` curves).
  Curves keep the depth order of the first record (natural sort of the
  paths, or ``order``); a curve that appears later is NaN before it.

  Args:
    order: layer paths in depth order (e.g. from :func:`forward_order`);
      ``None`` for a natural sort of the paths.

  Example:
    >>> import layca_jax as lx
    >>> history = lx.RotationHistory()
    >>> history.record(0, {'Dense_10': {'kernel': 0.0}, 'Dense_2': {'kernel': 0.0}})
    >>> history.record(5, {'Dense_10': {'kernel': 0.5}, 'Dense_2': {'kernel': 0.25}})
    >>> history.steps.tolist(), list(history.curves)
    ([0, 5], ['Dense_2/kernel', 'Dense_10/kernel'])
    >>> history.curves['Dense_10/kernel'].tolist()
    [0.0, 0.5]
  """

  def __init__(self, order: Sequence[str] | None = None):
    self._order = None if order is None else list(order)
    self._steps: list[int] = []
    self._values: dict[str, list[float]] = {}

  def record(self, step: int, rotations: PyTree) -> None:
    """Appends one record: ``rotations`` (a pytree, device or host) at ``step``."""
    flat = flatten_rotations(rotations, self._order)
    n = len(self._steps)
    for name in flat:
      self._values.setdefault(name, [float('nan')] * n)
    for name, values in self._values.items():
      values.append(flat.get(name, float('nan')))
    self._steps.append(int(step))

  def extend(self, steps: Sequence[int], rotations: PyTree) -> None:
    """Appends records whose leaves carry a leading step axis.

    Takes what :func:`rotation_history` returns: ``history.extend(*lx.
    rotation_history(state))``.
    """
    import jax  # Local: keeps this module's import light.
    for i, step in enumerate(np.asarray(steps)):
      self.record(int(step), jax.tree.map(lambda r, i=i: np.asarray(r)[i],
                                          rotations))

  def __len__(self) -> int:
    return len(self._steps)

  @property
  def steps(self) -> np.ndarray:
    """The recorded step numbers (int64)."""
    return np.asarray(self._steps, dtype=np.int64)

  @property
  def curves(self) -> dict[str, np.ndarray]:
    """``{path: float64 array over records}``, in depth order."""
    return {name: np.asarray(values, dtype=np.float64)
            for name, values in self._values.items()}

  def save(self, path: str | os.PathLike) -> None:
    """Writes a ``.npz`` file (no pickle): steps, names and values."""
    names = list(self._values)
    values = (np.asarray([self._values[n] for n in names], dtype=np.float64)
              if names else np.zeros((0, len(self._steps))))
    np.savez(path, steps=self.steps, names=np.asarray(names, dtype=str),
             values=values,
             order=np.asarray(self._order or [], dtype=str),
             has_order=np.asarray(self._order is not None))

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'RotationHistory':
    """Reads a file written by :meth:`save`."""
    with np.load(path, allow_pickle=False) as data:
      history = cls(order=data['order'].tolist()
                    if bool(data['has_order']) else None)
      history._steps = data['steps'].astype(int).tolist()
      history._values = {str(name): row.tolist()
                         for name, row in zip(data['names'], data['values'])}
    return history

  def __repr__(self) -> str:
    return f'RotationHistory({len(self)} records, {len(self._values)} curves)'


def as_curves(source: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """``(curves, steps)`` from a RotationHistory, a ``(steps, rotations)``
  pair from :func:`rotation_history`, or a mapping name -> sequence."""
  if isinstance(source, RotationHistory):
    return source.curves, source.steps
  if isinstance(source, tuple) and len(source) == 2:
    history = RotationHistory()
    history.extend(*source)
    return history.curves, history.steps
  if isinstance(source, dict) or hasattr(source, 'items'):
    return {str(k): np.asarray(v, dtype=np.float64).ravel()
            for k, v in source.items()}, None
  raise TypeError(
      f'Expected a RotationHistory, a (steps, rotations) pair or a mapping '
      f'name -> sequence, got {type(source).__name__}.')
