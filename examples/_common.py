"""What every example script shares: offline data, models, the training loop,
rotation tracking in-graph, checkpoints, plots and command-line glue.

Data never comes from the network: MNIST-1D is generated locally by
``mnist1d.data.make_dataset`` and the digits ship with scikit-learn.

A run is one ``jax.jit``-ed ``lax.scan`` over the batches of an epoch; the
optimizer is chained with ``lx.track_rotation`` so that layer rotations are
recorded in the optimizer state, in-graph, ``record_per_epoch`` times an
epoch, and read back once at the end with ``lx.rotation_history``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import layca_jax as lx

PyTree = Any


# ---------------------------------------------------------------------------
# Data.


class Dataset(NamedTuple):
  """Train and test arrays (float32 inputs, int32 labels)."""

  x: np.ndarray
  y: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
  """MNIST-1D generated locally (4000 train / 1000 test at the defaults).

  Inputs are shaped ``(n, 40, 1)`` (length, channels) for 1-D convolutions.
  ``seed`` is the generator's: 42 gives the published dataset.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  data = make_dataset(args)  # never get_dataset: that one downloads
  as_x = lambda a: np.asarray(a, np.float32)[..., None]
  return Dataset(as_x(data['x']), np.asarray(data['y'], np.int32),
                 as_x(data['x_test']), np.asarray(data['y_test'], np.int32),
                 'MNIST-1D')


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits (1797 images), pixels scaled to ``[0, 1]``."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  x = (x[order] / 16.0).astype(np.float32)
  y = y[order].astype(np.int32)
  n_test = int(round(test_fraction * len(y)))
  return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 'digits')


# ---------------------------------------------------------------------------
# Models. Each takes ``(x, train)``.


class Conv1D(nn.Module):
  """A 'same'-padded 1-D convolution written as unfold + einsum.

  Same parameter as ``nn.Conv`` (``kernel`` of shape ``(width, in, out)``).
  Why not ``nn.Conv``: XLA:CPU runs a convolution inside a while loop (our
  epoch is one ``lax.scan``) about 30x slower than outside one; a gather and
  a dot do not have that problem.
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
  """The model's layer paths in the order its computation uses them."""
  params, rest = split_variables(variables)
  apply = lambda p, x: model.apply({'params': p, **rest}, x, train=False)
  return lx.forward_order(apply, params, jnp.asarray(x[:1]))


# ---------------------------------------------------------------------------
# Optimizers and schedules used by the studies.


def kernels_only(params: PyTree) -> PyTree:
  """Mask of the layers (``ndim >= 2``): where L2 / weight decay applies."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def decay_factor(count: jax.Array, total_steps: int,
                 warmup_steps: int = 0) -> jax.Array:
  """The paper's step decays in miniature: 1, then 1/5 from 50% of training
  and 1/25 from 75%; times a linear warm-up over ``warmup_steps``."""
  factor = optax.piecewise_constant_schedule(
      1.0, {int(0.5 * total_steps): 0.2, int(0.75 * total_steps): 0.2})(count)
  # ``warmup_steps`` may be traced (an injected hyperparameter); 0 = none.
  return factor * jnp.minimum(1.0, (count + 1) / jnp.maximum(warmup_steps, 1))


def step_decay(rate: float | jax.Array, total_steps: int,
               warmup_steps: int = 0) -> optax.Schedule:
  """``rate * decay_factor(count, ...)`` as an optax schedule."""
  return lambda count: rate * decay_factor(count, total_steps, warmup_steps)


def sgd(learning_rate: optax.ScalarOrSchedule,
        weight_decay: float | jax.Array = 0.0) -> optax.GradientTransformation:
  """Plain SGD on every parameter, with optional L2 on the kernels
  (``weight_decay`` may be traced, e.g. from ``optax.inject_hyperparams``)."""
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  return optax.chain(
      optax.identity() if no_decay
      else optax.add_decayed_weights(weight_decay, kernels_only),
      optax.sgd(learning_rate))


# ---------------------------------------------------------------------------
# Training.


class TrainState(NamedTuple):
  """Everything a run carries from one epoch to the next (and checkpoints)."""

  params: PyTree
  model_state: dict
  opt_state: PyTree
  epoch: jax.Array


def with_tracking(tx: optax.GradientTransformation, steps_per_epoch: int,
                  epochs: int, record_per_epoch: int
                  ) -> tuple[optax.GradientTransformation, int]:
  """``tx`` followed by ``lx.track_rotation`` keeping the whole run's record.

  Returns the chain and the recording period (in steps).
  """
  every = max(1, steps_per_epoch // max(1, record_per_epoch))
  capacity = math.ceil(epochs * steps_per_epoch / every) + 1
  return optax.chain(tx, lx.track_rotation(every=every, history=capacity)), every


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


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
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return cross_entropy(logits, y), (dict(new_state), accuracy)

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


@dataclasses.dataclass
class Run:
  """One finished training run and what it measured."""

  name: str
  state: TrainState
  init_params: PyTree
  order: list[str]
  steps_per_epoch: int
  steps: np.ndarray                  # recorded steps (last one: the end)
  curves: dict[str, np.ndarray]      # layer path -> rotation at each step
  log: dict[str, list[float]]        # per-epoch train_loss, train_acc, test_acc
  seconds: float
  hyper: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def epochs(self) -> np.ndarray:
    """The recorded steps, in epochs (the curves' x axis)."""
    return self.steps / self.steps_per_epoch

  @property
  def test_acc(self) -> float:
    return self.log['test_acc'][-1]

  @property
  def final_rotation(self) -> dict[str, float]:
    return {path: float(curve[-1]) for path, curve in self.curves.items()}

  def norm_ratio(self) -> dict[str, float]:
    """``|w_final| / |w_init|`` per layer (1 when Layca holds the norm)."""
    norm = lambda tree: {
        k: float(np.linalg.norm(np.asarray(v, np.float64)))
        for k, v in flat_layers(tree, self.order).items()}
    final, init = norm(self.state.params), norm(self.init_params)
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


def flat_layers(params: PyTree, order: Sequence[str]) -> dict[str, jax.Array]:
  """The layer leaves of ``params`` by path, in ``order``."""
  specs = lx.layer_specs(params)
  by_path = {spec.path: leaf for spec, leaf in
             zip(specs, jax.tree.leaves(params)) if spec is not None}
  return {path: by_path[path] for path in order}


def rotation_curves(state: TrainState, init_params: PyTree,
                    final_step: int, order: Sequence[str]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Read the in-graph record back, and add the rotation after the last step.

  ``track_rotation`` records the params an update is applied to, so the
  params after the final update are measured here with ``lx.layer_rotation``.
  """
  history = lx.RotationHistory(order)
  history.extend(*lx.rotation_history(state.opt_state))
  steps = history.steps
  if not len(steps) or int(steps[-1]) < final_step:
    history.record(final_step, lx.layer_rotation(state.params, init_params))
  curves = history.curves
  return np.asarray(history.steps), {path: np.asarray(curves[path])
                                     for path in order}


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


_SHARED_EPOCH_FNS: dict[Any, Callable[..., Any]] = {}


def train(model: nn.Module, tx: optax.GradientTransformation, data: Dataset,
          *, epochs: int, seed: int = 0, batch_size: int = 128,
          record_per_epoch: int = 4, name: str = 'run', quiet: bool = False,
          checkpoint_dir: str | os.PathLike | None = None,
          resume: bool = False, hyper: dict[str, Any] | None = None,
          share_compilation: Any = None,
          stop_after: int | None = None) -> Run:
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
    checkpoint_dir: if given, the state is checkpointed there every epoch.
    resume: restart from the latest checkpoint in ``checkpoint_dir``.
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
  tracked_tx, _ = with_tracking(tx, steps_per_epoch, epochs, record_per_epoch)
  state = TrainState(init_params, model_state, tracked_tx.init(init_params),
                     jnp.zeros([], jnp.int32))
  log: dict[str, list[float]] = {'train_loss': [], 'train_acc': [],
                                 'test_acc': []}
  if checkpoint_dir and not resume and Path(checkpoint_dir).exists():
    shutil.rmtree(checkpoint_dir)  # a fresh run: no stale checkpoints
  manager = checkpoint_manager(checkpoint_dir) if checkpoint_dir else None
  if manager is not None and resume:
    restored = restore_checkpoint(manager, state)
    if restored is not None:
      state, log = restored

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
  steps, curves = rotation_curves(state, init_params,
                                  int(state.epoch) * steps_per_epoch, order)
  return Run(name, state, init_params, order, steps_per_epoch, steps, curves,
             log, time.perf_counter() - start_time, dict(hyper or {}))


def mean_rotation(run: Run) -> float:
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


# ---------------------------------------------------------------------------
# Command line, progress, output.


def progress_bar(*, total: int, desc: str, quiet: bool = False,
                 initial: int = 0):
  """tqdm, silent with ``--quiet`` or when stderr is not a terminal."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=desc, leave=False,
              disable=quiet or not sys.stderr.isatty())


def study_parser(description: str, *, epochs: int,
                 quick_epochs: int) -> argparse.ArgumentParser:
  """The flags every study shares: --epochs --seed --out --quick --quiet."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--epochs', type=int, default=None,
                      help=f'epochs per run (default {epochs}; '
                           f'{quick_epochs} with --quick)')
  parser.add_argument('--seed', type=int, default=0,
                      help='initialisation and batch-order seed')
  parser.add_argument('--out', default='.', help='output folder')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny version for tests: fewer epochs and runs')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  parser.set_defaults(_epochs=(epochs, quick_epochs))
  return parser


def parse_study_args(parser: argparse.ArgumentParser,
                     argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = parser.parse_args(argv)
  full, quick = args._epochs  # pylint: disable=protected-access
  del args._epochs
  if args.epochs is None:
    args.epochs = quick if args.quick else full
  Path(args.out).mkdir(parents=True, exist_ok=True)
  return args


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


def finish_study(args: argparse.Namespace, runs: Sequence[Run],
                 checks: dict[str, bool], stem: str, figures: Sequence[Path],
                 **extra: Any) -> dict[str, Any]:
  """Writes a study's JSON (``{stem}.json`` under ``args.out``: the command's
  arguments, every run, the paper's claims as checked on these runs
  (``checks``: claim -> holds) and ``extra``), prints its report, returns it."""
  result = {'args': vars(args), 'runs': [r.summary() for r in runs],
            'checks': checks, **extra}
  json_path = Path(args.out) / f'{stem}.json'
  write_json(json_path, result)
  report(result, json_path, figures)
  return result


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
# Plots.


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
        run.curves, steps=run.epochs, ax=ax, xlabel='Epoch',
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
  twin.plot(xs, [np.mean(list(r.final_rotation.values())) for r in runs],
            's--', color='C1')
  twin.set_ylabel('Mean final cosine distance', color='C1')
  if title:
    ax.set_title(title)
  return save_figure(fig, path)


def rate_label(rate: float) -> str:
  """``3^-2`` for powers of three, else the number."""
  if rate > 0:
    power = math.log(rate, 3)
    if abs(power - round(power)) < 1e-9:
      return f'3^{round(power)}'
  return f'{rate:g}'


def rate_sweep(description: str, argv: Sequence[str] | None, *,
               make_tx: Callable[[Any], Any], hyper: str, name: str, stem: str,
               title: str, xlabel: str, default_powers: Sequence[int],
               quick_powers: Sequence[int],
               extra_checks: Callable[[Sequence[Run]], dict] = lambda _: {},
               ) -> dict[str, Any]:
  """Trains the ConvNet on MNIST-1D at rates ``3^-k`` and reports rotation vs accuracy.

  The whole of the Layca-rate (Fig. 1) and SGD-learning-rate (Fig. 2)
  studies, command line included (the study flags and ``--powers``):
  ``make_tx(schedule)`` builds the optimizer for one rate (step decays at
  50% and 75%), compiled once for the sweep through
  ``optax.inject_hyperparams``; ``hyper`` names the rate in the results.
  Writes ``{stem}.json``, ``{stem}_curves.png`` and ``{stem}_accuracy.png``
  under ``--out``.
  """
  parser = study_parser(description, epochs=30, quick_epochs=2)
  parser.add_argument('--powers', type=int, nargs='+', default=None,
                      help=f'sweep the rates 3^-k for these k (default '
                           f'{list(default_powers)}; {list(quick_powers)} '
                           f'with --quick)')
  args = parse_study_args(parser, argv)
  data = mnist1d(num_samples=1000 if args.quick else 5000)
  total_steps = args.epochs * (data.x.shape[0] // 128)
  powers = args.powers or (quick_powers if args.quick else default_powers)
  rates = [3.0 ** -k for k in powers]
  factory = optax.inject_hyperparams(
      lambda rate: make_tx(step_decay(rate, total_steps)))
  runs = [
      train(ConvNet(), factory(rate=rate), data, epochs=args.epochs,
            seed=args.seed, quiet=args.quiet, name=f'{name} {rate_label(rate)}',
            hyper={hyper: rate}, share_compilation=stem)
      for rate in rates]
  ordered = sorted(runs, key=lambda r: r.hyper[hyper])
  rotation = [mean_rotation(r) for r in ordered]
  accuracy = [r.test_acc for r in ordered]
  checks = {
      **extra_checks(runs),
      f'the final layer rotation grows with the {xlabel}':
          increasing(rotation),
      'larger final rotations go with better test accuracy '
      '(rank correlation > 0)':
          rank_correlation(rotation, accuracy) > 0,
  }
  out = Path(args.out)
  figures = [
      plot_runs(runs, out / f'{stem}_curves.png',
                title=f'{title} ' + ', '.join(rate_label(r) for r in rates)
                + ' (step decays at 50% and 75%)'),
      plot_accuracy_vs_rotation(
          ordered, out / f'{stem}_accuracy.png', xlabel=xlabel,
          xs=[r.hyper[hyper] for r in ordered], log_x=True),
  ]
  result = finish_study(args, runs, checks, stem, figures,
                        rank_correlation=rank_correlation(rotation, accuracy))
  return result
