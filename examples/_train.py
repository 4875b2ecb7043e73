"""The studies' training loop: one jitted ``lax.scan`` per epoch, rotation
recorded in-graph, orbax checkpoints, and the schedules the studies share.

The optimizer is chained with ``lx.track_rotation(history=...)``, so layer
rotations are recorded in the optimizer state, inside the scanned step,
``record_per_epoch`` times an epoch, and read back once at the end with
``lx.rotation_history`` into an ``lx.RotationHistory``. Everything about
rotation (measuring, ordering, flattening, tables, curves) is ``layca_jax``'s;
this module only trains and keeps what a study reports (:class:`Run`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import layca_jax as lx

from _data import Dataset  # pylint: disable=g-bad-import-order

PyTree = Any


# ---------------------------------------------------------------------------
# Flax variables.


def init_variables(model: nn.Module, x: np.ndarray, seed: int) -> dict:
  """``model.init`` on one example, with the run's seed (jitted: eager
  initialisation dispatches op by op and is slow on CPU)."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))


def split_variables(variables: dict) -> tuple[PyTree, dict]:
  """``(params, other collections)`` -- e.g. ``batch_stats``."""
  variables = dict(variables)
  return variables.pop('params'), variables


def forward_order(model: nn.Module, variables: dict,
                  x: np.ndarray) -> list[str]:
  """``lx.forward_order`` of a Flax model called as ``model(x, train)``."""
  params, rest = split_variables(variables)
  apply = lambda p, x: model.apply({'params': p, **rest}, x, train=False)
  return lx.forward_order(apply, params, jnp.asarray(x[:1]))


# ---------------------------------------------------------------------------
# Schedules and plain optimizers the studies share.


def layers_mask(params: PyTree) -> PyTree:
  """True at the layers (``lx.layer_specs``' rule): where L2 applies."""
  return jax.tree.unflatten(jax.tree.structure(params),
                            [s is not None for s in lx.layer_specs(params)])


def decay_factor(count: jax.Array, total_steps: int,
                 warmup_steps: int | jax.Array = 0) -> jax.Array:
  """The paper's step decays in miniature: 1, then 1/5 from 50% of training
  and 1/25 from 75%; times a linear warm-up over ``warmup_steps``."""
  factor = optax.piecewise_constant_schedule(
      1.0, {int(0.5 * total_steps): 0.2, int(0.75 * total_steps): 0.2})(count)
  # ``warmup_steps`` may be traced (an injected hyperparameter); 0 = none.
  return factor * jnp.minimum(1.0, (count + 1) / jnp.maximum(warmup_steps, 1))


def step_decay(rate: float | jax.Array, total_steps: int,
               warmup_steps: int | jax.Array = 0) -> optax.Schedule:
  """``rate * decay_factor(count, ...)`` as an optax schedule."""
  return lambda count: rate * decay_factor(count, total_steps, warmup_steps)


def sgd(learning_rate: optax.ScalarOrSchedule,
        weight_decay: float | jax.Array = 0.0) -> optax.GradientTransformation:
  """Plain SGD on every parameter, with optional L2 on the layers
  (``weight_decay`` may be traced, e.g. from ``optax.inject_hyperparams``)."""
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  return optax.chain(
      optax.identity() if no_decay
      else optax.add_decayed_weights(weight_decay, layers_mask),
      optax.sgd(learning_rate))


# ---------------------------------------------------------------------------
# One epoch, one scan.


class TrainState(NamedTuple):
  """Everything a run carries from one epoch to the next (and checkpoints)."""

  params: PyTree
  model_state: dict
  opt_state: PyTree
  epoch: jax.Array


def with_tracking(tx: optax.GradientTransformation, steps_per_epoch: int,
                  epochs: int, record_per_epoch: int
                  ) -> optax.GradientTransformation:
  """``tx`` followed by ``lx.track_rotation`` keeping the whole run's record."""
  every = max(1, steps_per_epoch // max(1, record_per_epoch))
  capacity = math.ceil(epochs * steps_per_epoch / every) + 1
  return optax.chain(tx, lx.track_rotation(every=every, history=capacity))


def make_epoch_fn(model: nn.Module, tx: optax.GradientTransformation,
                  batch_size: int) -> Callable[..., tuple[TrainState, dict]]:
  """A jitted ``(state, x, y, key) -> (state, metrics)``: one epoch, one scan.

  The batches are a fresh permutation of the training set drawn from
  ``key`` (the remainder is dropped), so an epoch is a pure function of its
  inputs: a resumed run replays exactly what an uninterrupted one does.
  """

  def loss_fn(params, model_state, x, y):
    logits, new_state = model.apply(
        {'params': params, **model_state}, x, train=True,
        mutable=list(model_state))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (dict(new_state), jnp.mean(jnp.argmax(logits, -1) == y))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  @jax.jit
  def epoch_fn(state: TrainState, x: jax.Array, y: jax.Array,
               key: jax.Array) -> tuple[TrainState, dict]:
    steps = x.shape[0] // batch_size
    batches = jax.random.permutation(key, x.shape[0])[:steps * batch_size]

    def step(state, index):
      (loss, (model_state, accuracy)), grads = grad_fn(
          state.params, state.model_state, x[index], y[index])
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return TrainState(params, model_state, opt_state, state.epoch), (
          loss, accuracy)

    state, (loss, accuracy) = jax.lax.scan(
        step, state, batches.reshape(steps, batch_size))
    return state._replace(epoch=state.epoch + 1), {
        'train_loss': loss.mean(), 'train_acc': accuracy.mean()}

  return epoch_fn


def make_eval_fn(model: nn.Module) -> Callable[..., jax.Array]:
  @jax.jit
  def accuracy(params, model_state, x, y):
    logits = model.apply({'params': params, **model_state}, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)
  return accuracy


# ---------------------------------------------------------------------------
# A finished run.


@dataclasses.dataclass
class Run:
  """One finished training run and what it measured."""

  name: str
  state: TrainState
  init_params: PyTree
  order: list[str]
  steps_per_epoch: int
  history: lx.RotationHistory        # the record, the end of training last
  log: dict[str, list[float]]        # per-epoch train_loss, train_acc, test_acc
  seconds: float
  hyper: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def epochs(self) -> np.ndarray:
    """The recorded steps, in epochs (the curves' x axis)."""
    return self.history.steps / self.steps_per_epoch

  @property
  def curves(self) -> dict[str, np.ndarray]:
    """Layer path -> rotation at each recorded step, in forward order."""
    return self.history.curves

  @property
  def test_acc(self) -> float:
    return self.log['test_acc'][-1]

  @property
  def final_rotation(self) -> dict[str, float]:
    return {path: float(curve[-1]) for path, curve in self.curves.items()}

  def norm_ratio(self) -> dict[str, float]:
    """``|w_final| / |w_init|`` per layer (1 when Layca holds the norm)."""
    norms = lambda tree: lx.flatten_rotations(jax.tree.map(
        lambda w: np.linalg.norm(np.asarray(w, np.float64)), tree))
    final, init = norms(self.state.params), norms(self.init_params)
    return {k: final[k] / init[k] for k in self.order}

  def summary(self) -> dict[str, Any]:
    """What goes in a study's JSON."""
    rotation = self.final_rotation
    return {
        'name': self.name,
        **self.hyper,
        'test_acc': self.test_acc,
        'final_train_loss': self.log['train_loss'][-1],
        'final_rotation': rotation,
        'mean_final_rotation': float(np.mean(list(rotation.values()))),
        'norm_ratio': self.norm_ratio(),
        'test_acc_per_epoch': self.log['test_acc'],
        'train_loss_per_epoch': self.log['train_loss'],
        'curve_epochs': self.epochs.tolist(),
        'curves': {k: v.tolist() for k, v in self.curves.items()},
        'params_sha256': params_digest(self.state.params),
        'seconds': self.seconds,
    }


def params_digest(params: PyTree) -> str:
  """SHA-256 of every param's bytes, in tree order: equal iff bit-identical."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def read_history(state: TrainState, init_params: PyTree, final_step: int,
                 order: list[str]) -> lx.RotationHistory:
  """The in-graph record, plus the rotation after the last step.

  ``track_rotation`` records the params an update starts from, so the
  params after the final update are measured here with ``lx.layer_rotation``.
  """
  history = lx.RotationHistory(order)
  history.extend(*lx.rotation_history(state.opt_state))
  if not len(history) or int(history.steps[-1]) < final_step:
    history.record(final_step, lx.layer_rotation(state.params, init_params))
  return history


# ---------------------------------------------------------------------------
# Checkpoints (orbax): the whole TrainState and the per-epoch log.


def checkpoint_dir(out: str | os.PathLike, run_name: str) -> Path:
  """``out/checkpoints/<run name as a file name>``."""
  return Path(out) / 'checkpoints' / re.sub(r'[^\w.+-]+', '_', run_name)


def checkpoint_manager(directory: str | os.PathLike):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=2, enable_async_checkpointing=False))


def save_checkpoint(manager, state: TrainState, log: dict) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(int(state.epoch), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), log=ocp.args.JsonSave(log)))


def restore_checkpoint(manager, like: TrainState
                       ) -> tuple[TrainState, dict] | None:
  """The latest checkpoint, restored into ``like``'s structure, or None."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), log=ocp.args.JsonRestore()))
  state = jax.tree.unflatten(jax.tree.structure(like),
                             jax.tree.leaves(restored['state']))
  return state, dict(restored['log'])


# ---------------------------------------------------------------------------
# The loop.


def progress_bar(*, total: int, desc: str, quiet: bool = False,
                 initial: int = 0):
  """tqdm, silent with ``--quiet`` or when stderr is not a terminal."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, leave=False,
              disable=quiet or not sys.stderr.isatty())


_SHARED_EPOCH_FNS: dict[Any, Callable[..., Any]] = {}


def train(model: nn.Module, tx: optax.GradientTransformation, data: Dataset,
          *, epochs: int, seed: int = 0, batch_size: int = 128,
          record_per_epoch: int = 4, name: str = 'run', quiet: bool = False,
          checkpoints: str | os.PathLike | None = None,
          resume: bool = False, stop_after: int | None = None,
          hyper: dict[str, Any] | None = None,
          share_compilation: Any = None) -> Run:
  """Train ``model`` with ``tx`` and record its layer rotations in-graph.

  Args:
    model: a Flax module called as ``model(x, train)``.
    tx: the optimizer (``lx.track_rotation`` is chained after it here).
    data: train and test arrays.
    epochs: passes over the training set.
    seed: initialisation and batch order (``fold_in(key, epoch)``).
    batch_size: examples per step.
    record_per_epoch: rotation records per epoch.
    name: the progress bar's label and the run's name.
    quiet: no progress bar.
    checkpoints: if given, a folder where the state is checkpointed every
      epoch; without ``resume`` its old checkpoints are removed first.
    resume: restart from the latest checkpoint in ``checkpoints``; the run
      ends bit-identical to an uninterrupted one.
    stop_after: stop once this many epochs are done, as an interrupted run
      would (the schedule and record still span ``epochs``).
    hyper: hyperparameters stored in the run's summary.
    share_compilation: runs given the same (hashable) value reuse one
      compiled epoch: pass it only for optimizers built by the same
      ``optax.inject_hyperparams`` factory, whose hyperparameters live in
      the state (sweeps then compile once instead of once a run).

  Returns:
    The finished :class:`Run`.
  """
  start_time = time.perf_counter()
  variables = init_variables(model, data.x, seed)
  order = forward_order(model, variables, data.x)
  init_params, model_state = split_variables(variables)
  steps_per_epoch = data.x.shape[0] // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size {batch_size} exceeds the {data.x.shape[0]} '
                     f'training examples.')
  tracked_tx = with_tracking(tx, steps_per_epoch, epochs, record_per_epoch)
  state = TrainState(init_params, model_state, tracked_tx.init(init_params),
                     jnp.zeros([], jnp.int32))
  log: dict[str, list[float]] = {'train_loss': [], 'train_acc': [],
                                 'test_acc': []}
  if checkpoints and not resume and Path(checkpoints).exists():
    shutil.rmtree(checkpoints)  # a fresh run: no stale checkpoints
  manager = checkpoint_manager(checkpoints) if checkpoints else None
  if manager is not None and resume:
    restored = restore_checkpoint(manager, state)
    if restored is not None:
      state, log = restored
      print(f'{name}: resumed from the checkpoint of epoch {int(state.epoch)}')

  if share_compilation is None:
    epoch_fn = make_epoch_fn(model, tracked_tx, batch_size)
  else:
    key = (share_compilation, repr(model), batch_size, data.x.shape, epochs,
           record_per_epoch)
    epoch_fn = _SHARED_EPOCH_FNS.setdefault(
        key, make_epoch_fn(model, tracked_tx, batch_size))
  accuracy = make_eval_fn(model)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  done = int(state.epoch)
  with progress_bar(total=epochs, initial=min(done, epochs), desc=name,
                    quiet=quiet) as bar:
    for epoch in range(done, min(epochs, stop_after or epochs)):
      state, metrics = epoch_fn(state, x, y, jax.random.fold_in(data_key, epoch))
      log['train_loss'].append(float(metrics['train_loss']))
      log['train_acc'].append(float(metrics['train_acc']))
      log['test_acc'].append(float(accuracy(state.params, state.model_state,
                                            x_test, y_test)))
      bar.set_postfix(loss=f"{log['train_loss'][-1]:.3f}",
                      test_acc=f"{log['test_acc'][-1]:.3f}")
      bar.update()
      if manager is not None:
        save_checkpoint(manager, state, log)
  if manager is not None:
    manager.close()
  history = read_history(state, init_params,
                         int(state.epoch) * steps_per_epoch, order)
  return Run(name, state, init_params, order, steps_per_epoch, history, log,
             time.perf_counter() - start_time, dict(hyper or {}))
