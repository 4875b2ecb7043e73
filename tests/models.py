"""A small zoo of the models people train today, with Flax's default initialisers.

* ``TinyLM``: a linen transformer language model (``nn.Embed``, pre-LayerNorm
  ``nn.MultiHeadDotProductAttention`` whose 2-D query/key/value biases start
  at zero, a GELU MLP whose input projection carries a LoRA adapter with a
  zero ``B``, and a zero-initialised output head).
* ``NnxLM``: the same in Flax NNX, its blocks created with ``nnx.vmap`` and
  run with ``nnx.scan`` (stacked params: ``stack_axes={'blocks': 1}``), with
  ``nnx.LoRA`` on the head.
* ``ResNet``: a BatchNorm ResNet-style CNN (residual blocks, no conv bias).
* ``MLP``: a ReLU MLP.

Each comes with a batch of a learnable task, in :func:`linen_zoo` and
:func:`nnx_lm`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB, WIDTH, LENGTH, HEADS, DEPTH = 12, 16, 8, 2, 2


def next_token_batch(seed: int = 0, batch: int = 16):
  """Sequences counting up modulo VOCAB from random starts: the target of
  each position is the next token."""
  start = np.random.default_rng(seed).integers(0, VOCAB, size=(batch, 1))
  tokens = (start + np.arange(LENGTH + 1)) % VOCAB
  return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)


class LoRADense(nn.Module):
  """``Dense`` plus a rank-``rank`` adapter ``x @ lora_a @ lora_b``, ``B = 0``."""

  features: int
  rank: int = 2

  @nn.compact
  def __call__(self, x):
    lora_a = self.param('lora_a', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.rank))
    lora_b = self.param('lora_b', nn.initializers.zeros,
                        (self.rank, self.features))
    return nn.Dense(self.features, name='base')(x) + x @ lora_a @ lora_b


class TinyLM(nn.Module):
  """A pre-LayerNorm transformer LM, every initialiser Flax's default."""

  depth: int = 1   # Unrolled: each block compiles again (NnxLM scans two).

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH)(tokens)
    for i in range(self.depth):
      h = nn.LayerNorm(name=f'ln_attn_{i}')(x)
      x = x + nn.MultiHeadDotProductAttention(
          num_heads=HEADS, name=f'attn_{i}')(h, mask=nn.make_causal_mask(tokens))
      h = nn.LayerNorm(name=f'ln_mlp_{i}')(x)
      h = nn.gelu(LoRADense(2 * WIDTH, name=f'mlp_in_{i}')(h))
      x = x + nn.Dense(WIDTH, name=f'mlp_out_{i}')(h)
    x = nn.LayerNorm(name='ln_final')(x)
    return nn.Dense(VOCAB, kernel_init=nn.initializers.zeros, name='head')(x)


class ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(self.channels, (3, 3), use_bias=False)(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
    h = nn.Conv(self.channels, (3, 3), use_bias=False)(h)
    h = nn.BatchNorm(use_running_average=not train)(h)
    return nn.relu(x + h)


class ResNet(nn.Module):
  """Stem conv, two residual blocks, global pooling, a dense head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(8, (3, 3), use_bias=False, name='stem')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='stem_bn')(x))
    x = ResBlock(8, name='block_0')(x, train)
    x = ResBlock(8, name='block_1')(x, train)
    return nn.Dense(4, name='head')(x.mean(axis=(1, 2)))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.relu(nn.Dense(32, name=f'hidden_{i}')(x))
    return nn.Dense(4, name='out')(x)


def blob_batch(seed: int = 0, n: int = 64, shape=(16,)):
  """Four Gaussian blobs: a learnable classification batch."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, size=n)
  centres = rng.normal(size=(4,) + shape) * 2.0
  x = centres[y] + rng.normal(size=(n,) + shape)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()


class LinenCase(NamedTuple):
  """A linen model ready to train: ``loss(params, extra) -> (loss, extra)``."""

  params: Any
  extra: Any                 # batch_stats, or an empty dict
  loss: Callable[[Any, Any], tuple[jax.Array, Any]]
  options: dict              # unit options its params need (stack_axes, ...)


def linen_zoo() -> dict[str, LinenCase]:
  """The linen models, initialised with seed 0, each with its batch."""
  tokens, targets = next_token_batch()
  lm = TinyLM()
  lm_params = lm.init(jax.random.PRNGKey(0), tokens)['params']

  def lm_loss(params, extra):
    return cross_entropy(lm.apply({'params': params}, tokens), targets), extra

  images, labels = blob_batch(shape=(8, 8, 3))
  cnn = ResNet()
  cnn_vars = cnn.init(jax.random.PRNGKey(0), images)

  def cnn_loss(params, batch_stats):
    logits, new = cnn.apply({'params': params, 'batch_stats': batch_stats},
                            images, mutable=['batch_stats'])
    return cross_entropy(logits, labels), new['batch_stats']

  x, y = blob_batch()
  mlp = MLP()
  mlp_params = mlp.init(jax.random.PRNGKey(0), x)['params']

  def mlp_loss(params, extra):
    return cross_entropy(mlp.apply({'params': params}, x), y), extra

  return {
      'transformer': LinenCase(lm_params, {}, lm_loss, {}),
      'resnet': LinenCase(cnn_vars['params'], cnn_vars['batch_stats'],
                          cnn_loss, {}),
      'mlp': LinenCase(mlp_params, {}, mlp_loss, {}),
  }


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.ln_attn = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH,
                                       decode=False, rngs=rngs)
    self.ln_mlp = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.mlp_in = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.mlp_out = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(x[..., 0])
    x = x + self.attn(self.ln_attn(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


class NnxLM(nnx.Module):
  """The NNX transformer: ``DEPTH`` blocks stacked by ``nnx.vmap``, run by
  ``nnx.scan``; a zero-initialised head with a LoRA adapter (``B = 0``)."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)

    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return NnxBlock(rngs)

    self.blocks = make_blocks(rngs)
    self.ln_final = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, VOCAB, kernel_init=nnx.initializers.zeros,
                           rngs=rngs)
    self.lora = nnx.LoRA(WIDTH, 2, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    x = self.ln_final(run(x, self.blocks))
    return self.head(x) + self.lora(x)


def nnx_lm() -> tuple[NnxLM, Callable[[NnxLM], jax.Array]]:
  """A fresh :class:`NnxLM` (seed 0) and its loss on the counting task."""
  tokens, targets = next_token_batch()
  return NnxLM(nnx.Rngs(0)), lambda model: cross_entropy(model(tokens), targets)
