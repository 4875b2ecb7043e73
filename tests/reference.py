"""Algorithm 1 of the paper and optax's base directions, written independently in NumPy float64.

Used by the tests as the ground truth. Nothing here imports layca_jax.
"""

from __future__ import annotations

import numpy as np


def sgd_direction(momentum: float = 0.0, nesterov: bool = False):
  """optax.trace: ``t <- g + momentum * t``; Nesterov returns ``g + momentum * t``."""
  state = {}

  def direction(name, g):
    t = g + momentum * state.get(name, np.zeros_like(g))
    state[name] = t
    return g + momentum * t if nesterov else t

  return direction


def adam_direction(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
  state = {}

  def direction(name, g):
    mu, nu, t = state.get(name, (np.zeros_like(g), np.zeros_like(g), 0))
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    t += 1
    state[name] = (mu, nu, t)
    mu_hat = mu / (1 - b1 ** t)
    nu_hat = nu / (1 - b2 ** t)
    return mu_hat / (np.sqrt(nu_hat + eps_root) + eps)

  return direction


def rmsprop_direction(decay=0.9, eps=1e-8):
  state = {}

  def direction(name, g):
    nu = decay * state.get(name, np.zeros_like(g)) + (1 - decay) * g * g
    state[name] = nu
    return g / np.sqrt(nu + eps)

  return direction


def adagrad_direction(initial_accumulator_value=0.1, eps=1e-7):
  state = {}

  def direction(name, g):
    acc = state.get(name, np.full_like(g, initial_accumulator_value)) + g * g
    state[name] = acc
    return g / np.sqrt(acc + eps)

  return direction


def layca_step(w: np.ndarray, s: np.ndarray, w0_norm: float, rate: float) -> np.ndarray:
  """One step of Algorithm 1 on one layer (flattened), with descent sign."""
  w = w.astype(np.float64)
  s = s.astype(np.float64).ravel()
  flat = w.ravel()
  s = s - (s @ flat) / (flat @ flat) * flat              # 1. tangent space
  norm_s = np.linalg.norm(s)
  s = s * np.linalg.norm(flat) / norm_s if norm_s > 0 else s   # 2. normalise
  flat = flat - rate * s                                 # 3. step
  flat = flat * w0_norm / np.linalg.norm(flat)           # 4. back on the sphere
  return flat.reshape(w.shape)


def unit_slices(shape, stack_axes=0, per_neuron=False):
  """Index tuples of each rotation unit of a leaf of ``shape``."""
  stack = list(np.ndindex(*shape[:stack_axes]))
  neurons = range(shape[-1]) if per_neuron else [None]
  for s in stack:
    for n in neurons:
      if n is None:
        yield tuple(s)
      else:
        yield tuple(s) + (Ellipsis, n)


def layca_run(params, grads_seq, rate, direction, is_layer, stack_axes=0,
              per_neuron=False, multipliers=None):
  """Runs Algorithm 1 over a sequence of gradient dicts; non-layers frozen.

  ``rate``: a float, or a function of the step index ``t`` (a schedule).

  ``params`` and each element of ``grads_seq``: dicts name -> ndarray.
  ``multipliers``: dict name -> float (whole-layer multiplier), default 1.
  """
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  norms0 = {}
  for k, v in w.items():
    if is_layer(k):
      for idx in unit_slices(v.shape, stack_axes, per_neuron):
        norms0[k, idx] = np.linalg.norm(v[idx])
  for t, grads in enumerate(grads_seq):
    rate_t = float(rate(t)) if callable(rate) else rate
    for k in w:
      d = direction(k, np.asarray(grads[k], np.float64))
      if not is_layer(k):
        continue
      m = 1.0 if multipliers is None else multipliers[k]
      new = w[k].copy()
      for idx in unit_slices(w[k].shape, stack_axes, per_neuron):
        new[idx] = layca_step(w[k][idx], d[idx], norms0[k, idx], rate_t * m)
      w[k] = new
  return w
