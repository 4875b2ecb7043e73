"""The studies' models: the MNIST-1D CNN and the 1-hidden-layer MLP.

Each is called as ``model(x, train)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Conv1D(nn.Module):
  """A 'same'-padded 1-D convolution written as unfold + einsum.

  Same parameter as ``nn.Conv`` (``kernel`` of shape ``(width, in, out)``).
  Why not ``nn.Conv``: the studies run an epoch as one ``lax.scan``, and
  XLA:CPU runs a convolution inside a while loop about 30x slower than
  outside one; a gather and a dot do not have that problem. (The quickstart,
  one jitted step per batch, uses ``nn.Conv``.)
  """

  features: int
  width: int = 5
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.width, x.shape[-1], self.features))
    pad = self.width // 2
    padded = jnp.pad(x, ((0, 0), (pad, self.width - 1 - pad), (0, 0)))
    starts = np.arange(0, x.shape[1], self.stride)
    patches = padded[:, starts[:, None] + np.arange(self.width)[None], :]
    return jnp.einsum('bnwc,wcf->bnf', patches, kernel)


class ConvNet(nn.Module):
  """Three Conv-BatchNorm-ReLU blocks and a Dense classifier (MNIST-1D).

  Convolutions have no bias (BatchNorm follows). The layers, in forward
  order: ``Conv_0/kernel``, ``Conv_1/kernel``, ``Conv_2/kernel``,
  ``Dense_0/kernel``.
  """

  channels: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, stride in enumerate((1, 2, 2)):
      x = Conv1D(self.channels, stride=stride, name=f'Conv_{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       name=f'BatchNorm_{i}')(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes, name='Dense_0')(
        x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
  """One hidden ReLU layer (Section 6 of the paper): ``Dense_0``, ``Dense_1``."""

  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)
