"""Paper-style rotation curves (Agg backend) and the terminal table."""

import sys

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use('Agg')

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

import layca_jax as lx  # noqa: E402


def _history():
  history = lx.RotationHistory()
  for step in range(0, 50, 10):
    t = step / 40
    history.record(step, {f'Dense_{i}': {'kernel': jnp.asarray(t * (i + 1) / 2)}
                          for i in (0, 1, 2, 10)})
  return history


def test_plot_saves_png_one_line_per_layer_viridis_by_depth(tmp_path):
  history = _history()
  ax = lx.plot_layer_rotation_curves(history, xlabel='Epoch', title='rot')
  path = tmp_path / 'curves.png'
  ax.figure.savefig(path)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  names = list(history.curves)
  assert names == ['Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel',
                   'Dense_10/kernel']
  assert [line.get_label() for line in ax.lines] == names
  colours = [mcolors.to_rgba(line.get_color()) for line in ax.lines]
  assert len(set(colours)) == len(names)
  viridis = matplotlib.colormaps['viridis']
  np.testing.assert_allclose(colours[0], viridis(0.0))  # input layer: low end
  np.testing.assert_allclose(colours[-1], viridis(1.0))
  # Depth order along the colormap: increasing position.
  lut = viridis(np.linspace(0, 1, 256))
  positions = [np.argmin(np.abs(lut - c).sum(axis=1)) for c in colours]
  assert positions == sorted(positions)
  np.testing.assert_array_equal(ax.lines[0].get_xdata(), history.steps)
  assert ax.get_ylabel() == 'Cosine distance'
  assert ax.get_xlabel() == 'Epoch' and ax.get_title() == 'rot'
  data_max = max(v.max() for v in history.curves.values())
  bottom, top = ax.get_ylim()
  assert data_max > 1 and bottom <= 0 and top >= max(1.0, data_max)
  plt.close(ax.figure)


def test_plot_accepts_mappings_and_state_histories_and_covers_unit_range():
  fig, ax = plt.subplots()
  out = lx.plot_layer_rotation_curves({'a': [0.0, 0.1], 'b': [0.0, 0.2]},
                                      steps=[5, 6], ax=ax)
  assert out is ax and len(ax.lines) == 2
  assert ax.get_ylim()[0] <= 0 and ax.get_ylim()[1] >= 1.0
  np.testing.assert_array_equal(ax.lines[1].get_xdata(), [5, 6])
  plt.close(fig)
  steps = np.array([0, 2])
  rotations = {'k': np.array([[0.0, 0.0], [0.1, 0.3]]), 'b': None}
  ax = lx.plot_layer_rotation_curves((steps, rotations), legend=False)
  assert [line.get_label() for line in ax.lines] == ['k/0', 'k/1']
  assert len(ax.figure.axes) == 2  # the depth colour bar
  plt.close(ax.figure)
  with pytest.raises(ValueError, match="'a'"):
    lx.plot_layer_rotation_curves({'a': [0.0, 0.1]}, steps=[1, 2, 3])


def test_missing_matplotlib_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
  with pytest.raises(ImportError, match=r"pip install 'layca-jax\[plot\]'"):
    lx.plot_layer_rotation_curves({'a': [0.0]})


def test_rotation_table_rows_in_depth_order_with_shapes_and_angles():
  w0 = {'Dense_10': {'kernel': jnp.eye(2), 'bias': jnp.zeros(2)},
        'Dense_2': {'kernel': jnp.eye(3)}}
  w = {'Dense_10': {'kernel': jnp.array([[0., 1.], [-1., 0.]]),
                    'bias': jnp.ones(2)},
       'Dense_2': {'kernel': jnp.eye(3)}}
  table = lx.rotation_table(lx.layer_rotation(w, w0), w)
  lines = table.splitlines()
  assert lines[0].split() == ['layer', 'shape', 'cosine', 'distance', 'angle',
                              '(deg)']
  assert lines[1].split() == ['Dense_2/kernel', '(3,', '3)', '0.0000', '0.00']
  assert lines[2].split() == ['Dense_10/kernel', '(2,', '2)', '1.0000', '90.00']
  per_unit = lx.rotation_table(
      lx.layer_rotation(w, w0, per_neuron=True), order=['Dense_10/kernel',
                                                         'Dense_2/kernel'])
  assert per_unit.splitlines()[1].startswith('Dense_10/kernel  (2,)')
  assert '[1.0000, 1.0000]' in per_unit
