"""Whole training step of a ResNet-18-style Flax model: optax.sgd vs lx.layca_sgd.

A CIFAR-style ResNet-18 (3x3 stem, four stages of two basic blocks, BatchNorm,
32x32 inputs, 10 classes) on a fixed synthetic batch; forward, backward,
BatchNorm statistics, optimizer update and apply, ``--steps`` steps inside one
``jit`` (``lax.fori_loop``), timed after a warm-up, the two optimizers in
interleaved rounds. Batch 256 on GPU; on CPU a smaller batch and width
(``--batch``, ``--width``) keep it short.

    python benchmarks/bench_train_step.py                  # CPU: batch 16, width 16
    python benchmarks/bench_train_step.py --full           # batch 256, width 64
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import _common as common
import layca_jax as lx


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm()(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  width: int = 64
  stages: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for i, blocks in enumerate(self.stages):
      for b in range(blocks):
        x = BasicBlock(self.width * 2 ** i, 2 if i > 0 and b == 0 else 1)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def train_loop(model: nn.Module, tx: optax.GradientTransformation, steps: int):

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                  images, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def run(params, batch_stats, opt_state, images, labels):
    def body(_, carry):
      params, batch_stats, opt_state, loss = carry
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch_stats, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss
    return jax.lax.fori_loop(0, steps, body, (params, batch_stats, opt_state,
                                              jnp.zeros([], jnp.float32)))

  return run


def main() -> None:
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--width', type=int, default=None)
  args = parser.parse_args()
  cpu = common.on_cpu()
  small = cpu and not args.full
  batch = args.batch or (16 if small else 256)
  width = args.width or (16 if small else 64)
  steps = args.steps or (3 if small else 20)
  repeats = args.repeats or (5 if small else 10)
  model = ResNet18(width=width)
  key = jax.random.PRNGKey(0)
  images = jax.random.normal(key, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(key, (batch,), 0, 10)
  variables = model.init(key, images[:2])
  params, batch_stats = variables['params'], variables['batch_stats']
  optimizers = {'optax.sgd': optax.sgd(0.1), 'lx.layca_sgd': lx.layca_sgd(3.0 ** -3)}
  fns = {}
  for name, tx in optimizers.items():
    run = train_loop(model, tx, steps)
    state = tx.init(params)
    fns[name] = (lambda run=run, state=state:
                 run(params, batch_stats, state, images, labels))
  times = common.time_interleaved(fns, repeats)
  rows = common.ratio_rows(times, steps, 'optax.sgd', 'optimizer', 'vs_sgd',
                           batch=batch, width=width,
                           params=common.tree_size(params),
                           leaves=len(jax.tree.leaves(params)))
  common.report('bench_train_step', rows,
                ['optimizer', 'ms', 'min_ms', 'vs_sgd', 'vs_sgd_min'],
                f'ResNet-18 training step, batch {batch}, width {width}', args,
                steps=steps, repeats=repeats)


if __name__ == '__main__':
  main()
