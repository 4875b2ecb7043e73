"""Quickstart: how far each layer of a small CNN turns, with SGD and with Layca.

MNIST-1D (generated locally), a 3-conv BatchNorm CNN and three runs: plain SGD
at the paper's default learning rate 3^-3 (untuned for this model), plain SGD
at 3^-1 (the best of examples/study_sgd_lr.py's sweep) and Layca-SGD at rate
3^-2. ``lx.track_rotation`` records each layer's rotation in the optimizer
state. Prints a rotation table per run and a summary; writes
``layer_rotation_curves.png`` and ``quickstart.json``.

    python examples/quickstart.py        # 20 epochs, about 30 s of CPU time
"""

import argparse
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from mnist1d.data import get_dataset_args, make_dataset

import layca_jax as lx

matplotlib.use('Agg')  # files only
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
parser.add_argument('--epochs', type=int, help='20 (2 with --quick)')
parser.add_argument('--seed', type=int, default=0, help='init and batches')
parser.add_argument('--out', default='.', help='folder for figure and JSON')
parser.add_argument('--quick', action='store_true', help='tiny run for tests')
parser.add_argument('--quiet', action='store_true', help='no epoch lines')
args = parser.parse_args()
epochs = args.epochs or (2 if args.quick else 20)

# MNIST-1D made on the spot (never `get_dataset`: it downloads); 80% train.
data_args = get_dataset_args()
data_args.num_samples = 1000 if args.quick else 5000
data = make_dataset(data_args)
x_train, x_test = (data[k].astype(np.float32)[..., None] for k in ('x', 'x_test'))
y_train, y_test = (data[k].astype(np.int32) for k in ('y', 'y_test'))


class CNN(nn.Module):
  """Three Conv-BatchNorm-ReLU blocks, then a linear classifier."""

  @nn.compact
  def __call__(self, x, train: bool):
    for stride in (1, 2, 2):
      x = nn.Conv(32, (5,), strides=stride, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


model = CNN()
batch_size = 128
steps_per_epoch = len(x_train) // batch_size
total_steps = epochs * steps_per_epoch
every = max(1, steps_per_epoch // 4)  # four rotation records an epoch


def decayed(rate):
  """The paper's step decays: rate / 5 at 50% and again at 75% of training."""
  return optax.piecewise_constant_schedule(
      rate, {total_steps // 2: 0.2, 3 * total_steps // 4: 0.2})


def train(optimizer):
  """A fresh CNN trained with `optimizer`: (params, init params, history)."""
  variables = model.init(jax.random.PRNGKey(args.seed), x_train[:1],
                         train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  # track_rotation passes the updates through; every `every` steps it records
  # each layer's cosine distance to its initial weights, in-graph.
  tx = optax.chain(optimizer, lx.track_rotation(
      every=every, history=total_steps // every + 1))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, new = model.apply({'params': params, 'batch_stats': batch_stats},
                                x, train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)  # needs params
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(args.seed)  # the same batches for every run
  for epoch in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      batch = order[i * batch_size:(i + 1) * batch_size]
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, x_train[batch], y_train[batch])
    if not args.quiet:
      print(f'  epoch {epoch + 1:2d}  train loss {float(loss):.3f}')

  logits = model.apply({'params': params, 'batch_stats': batch_stats}, x_test,
                       train=False)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  # The record holds the params each update started from: add the last ones.
  history = lx.RotationHistory()  # natural order = forward order here
  history.extend(*lx.rotation_history(opt_state))
  history.record(total_steps, lx.layer_rotation(params, variables['params']))
  return params, variables['params'], history, accuracy


runs = {
    'SGD, lr 3^-3 (untuned)': optax.sgd(decayed(3.0 ** -3)),
    'SGD, lr 3^-1 (tuned)': optax.sgd(decayed(3.0 ** -1)),
    'Layca-SGD, rate 3^-2': lx.layca_sgd(decayed(3.0 ** -2)),
}
results, histories = {}, {}
norms = lambda tree: lx.flatten_rotations(jax.tree.map(jnp.linalg.norm, tree))
for name, optimizer in runs.items():
  print(f'{name}: {epochs} epochs')
  params, init, histories[name], accuracy = train(optimizer)
  print(lx.rotation_table(lx.layer_rotation(params, init), params), '\n')
  curves, final, start = histories[name].curves, norms(params), norms(init)
  results[name] = {
      'test_acc': accuracy,
      'final_rotation': {k: float(v[-1]) for k, v in curves.items()},
      'norm_ratio': {k: final[k] / start[k] for k in curves},  # Layca: 1
      'curve_epochs': (histories[name].steps / steps_per_epoch).tolist(),
      'curves': {k: v.tolist() for k, v in curves.items()}}

# The summary: how far each layer turned, and the accuracy that goes with it.
layers = list(curves)
print(f"{'final cosine distance':<23}"
      + ''.join(f'{k.split("/")[0]:>8}' for k in layers) + '    mean  test acc')
for name, r in results.items():
  rotation = list(r['final_rotation'].values())
  print(f'{name:<23}' + ''.join(f'{v:8.3f}' for v in rotation)
        + f'{np.mean(rotation):8.3f}{r["test_acc"]:10.1%}')


def compare(a, b):
  """Runs `a` vs `b`: the accuracy gap, and how far their layers turned."""
  ra, rb = results[a]['final_rotation'], results[b]['final_rotation']
  gap = 100 * (results[a]['test_acc'] - results[b]['test_acc'])
  # Over seeds 0-2 the tuned runs vary by ~1 point (examples/README.md).
  return (f'{a} vs {b}: {gap:+.1f} points of test accuracy'
          + (' (small: about the seed-to-seed spread)' if abs(gap) < 2 else '')
          + f'; {sum(ra[k] > rb[k] for k in layers)} of {len(layers)} layers '
          f'turned further (least-turned layer {min(ra.values()):.3f} vs '
          f'{min(rb.values()):.3f}, mean {np.mean(list(ra.values())):.3f} vs '
          f'{np.mean(list(rb.values())):.3f}).')


untuned, tuned, layca = results
print(f'\nSeed {args.seed} only: rerun with other --seed values for the spread.'
      f'\n{compare(tuned, untuned)}\n{compare(layca, tuned)}')

figure, axes = plt.subplots(1, len(runs), figsize=(11.4, 3.2), sharey=True)
for ax, name in zip(axes, runs):
  lx.plot_layer_rotation_curves(
      histories[name], steps=histories[name].steps / steps_per_epoch, ax=ax,
      xlabel='Epoch', title=f'{name}\ntest acc {results[name]["test_acc"]:.1%}')
figure.tight_layout()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
figure.savefig(out / 'layer_rotation_curves.png', dpi=110)
(out / 'quickstart.json').write_text(json.dumps(
    {'args': vars(args), 'epochs': epochs, 'runs': results}, indent=1))
print(f'\nwrote {out / "layer_rotation_curves.png"} and quickstart.json')
