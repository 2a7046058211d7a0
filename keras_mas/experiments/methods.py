"""Continual-learning methods in one machinery: MAS and the baselines.

Every method is a small description of what differs from plain sequential
training; `training.run_sequence` does the rest the same way for all, so
comparisons are fair. Penalty methods differ only in how the importance Ω
of `λ Σ Ω (θ − θ*)²` is measured and accumulated (they share `MASModel`'s
anchors, penalty and `consolidate`):

| method       | Ω                                                 | accumulate |
| ------------ | ------------------------------------------------- | ---------- |
| `mas`        | mean |∂‖F(x)‖²/∂θ| (Aljundi et al. 2018)          | sum        |
| `local_mas`  | per layer, Hebbian                                | sum        |
| `l2`         | 1                                                 | sum        |
| `ewc`        | Fisher, empirical or sampled (Kirkpatrick 2017)   | sum        |
| `online_ewc` | Fisher (Schwarz et al. 2018)                      | decay      |
| `si`         | path integral (Zenke et al. 2017)                 | sum        |

`finetune` trains with no protection, `lwf` distils the previous model's
outputs on the new data (Li & Hoiem 2017, `Distillation`) and `joint`
trains on every task so far (the upper bound, `Rehearsal`). Each method's
training data, loss and consolidation read in its class here; the runners
ask the method (`training_data`, `consolidation`, `consolidation_data`).

One registry, `METHODS`, serves both runners: `run_sequence` is told where
each task ends (`Method.task_aware`), `run_stream` is not
(`Method.task_free`). On a stream `mas` consolidates where its loss window
finds a plateau, `mas_oracle` at the true boundaries, `replay` rehearses the
hard buffer without a penalty and `finetune` learns online.
"""

import dataclasses

import numpy as np

from keras_mas.core import heads
from keras_mas.data import pipelines
from keras_mas.experiments import checkpoints
from keras_mas.experiments import evaluation

__all__ = ["METHODS", "Distillation", "Method", "Rehearsal", "get", "names",
           "training_data"]


@dataclasses.dataclass(frozen=True)
class Method:
  """A continual-learning method: what it trains on, what it consolidates.

  The base class trains on the task's own data and loss; a penalty method
  differs only in its estimator (`consolidate(method=...)`).

  Attributes:
    name: the method's name.
    estimator: `consolidate(method=...)` estimator, or None for no penalty.
    accumulate: `"sum"` or `"decay"` for `consolidate`.
    labels: whether the estimator reads labels.
    slice_outputs: whether the estimator takes `output_fn` (the task's
      outputs) rather than measuring every output.
    options: extra estimator options.
    tracks_path: the model must track SI's path integral.
    task_aware: `run_sequence` offers it (task boundaries given).
    task_free: `run_stream` offers it (no task boundaries).
  """
  name: str
  estimator: str = None
  accumulate: str = "sum"
  labels: bool = False
  slice_outputs: bool = False
  options: tuple = ()
  tracks_path: bool = False
  task_aware: bool = True
  task_free: bool = False

  def training_data(self, net, sequence, k, batch_size, temperature=2.0,
                    seed=0, frozen=None):
    """`(x, y, loss, metrics)` to fit task `k`.

    Arrays give `(x, y)`; a streaming sequence gives the batched `tf.data`
    pipeline `fit` reads as `x` (shuffled in a bounded buffer seeded by
    `seed`) and `y` None.
    """
    del net, temperature, frozen
    task = sequence.tasks[k]
    loss = heads.TaskLoss(task.start, task.stop, task.label_offset)
    if task.streaming:
      return (pipelines.training_batches(task.train_data, batch_size, seed,
                                         check=task.label_check), None,
              loss, [_accuracy(task)])
    return task.x_train, task.y_train, loss, [_accuracy(task)]

  def consolidation(self, task, strength, alpha, num_samples,
                    fisher="empirical", normalize=None):
    """`MASModel.consolidate`'s arguments after `task`.

    No batch size: importance batches by input size, not at the training
    batch size (a pass costs a fraction of an epoch).
    """
    options = dict(self.options)
    if self.slice_outputs:
      options["output_fn"] = heads.OutputSlice(task.start, task.stop)
    if self.estimator == "fisher":
      options["empirical"] = fisher == "empirical"
    return dict(method=self.estimator, strength=strength,
                accumulate=self.accumulate, alpha=alpha,
                num_samples=num_samples, normalize=normalize, **options)

  def consolidation_data(self, task, input_shape=None):
    """The inputs (and labels, if the estimator reads them) of `task`.

    Arrays for an array task; batches of a streaming task's training
    pipeline (inputs of `input_shape`) otherwise.
    """
    if task.streaming:
      return pipelines.importance_batches(
          task.train_data, input_shape,
          label_shift=task.label_offset if self.labels else None,
          check=task.label_check)
    if self.labels:
      return (task.x_train, task.y_train + task.label_offset)
    return task.x_train


@dataclasses.dataclass(frozen=True)
class Distillation(Method):
  """LwF: the task's loss plus distillation of the outputs of the earlier
  tasks, as the model gave them before this task (Li & Hoiem 2017)."""

  def training_data(self, net, sequence, k, batch_size, temperature=2.0,
                    seed=0, frozen=None):
    """As `Method.training_data`, each label followed by the old logits.

    Arrays: the logits the model gives *before* training on task `k`, for
    the outputs of earlier tasks (what a frozen copy would give: it is never
    updated), appended to each label. A streaming task: `frozen`, a copy of
    the model made now (or the one given), applied to each batch in the
    pipeline, so no task's logits are ever held whole.
    """
    if k == 0:
      return super().training_data(net, sequence, k, batch_size, seed=seed)
    task = sequence.tasks[k]
    old_start, old_stop = 0, max(t.stop for t in sequence.tasks[:k])
    loss = heads.DistillationLoss(task.start, task.stop, task.label_offset,
                                  old_start, old_stop,
                                  temperature=temperature)
    if task.streaming:
      if frozen is None:
        frozen = checkpoints.copy_model(net, wrap=False)
      return (pipelines.distillation_batches(
          task.train_data, frozen, (old_start, old_stop), batch_size, seed,
          check=task.label_check), None, loss, [_accuracy(task)])
    old = evaluation.predict_logits(net, task.x_train,
                                    batch_size)[:, old_start:old_stop]
    y = np.concatenate([task.y_train[:, None].astype("float32"), old], axis=1)
    return task.x_train, y, loss, [_accuracy(task)]


@dataclasses.dataclass(frozen=True)
class Rehearsal(Method):
  """Joint training: every task so far, each sample on its own outputs."""

  def training_data(self, net, sequence, k, batch_size, temperature=2.0,
                    seed=0, frozen=None):
    """Tasks `0..k` together, each label carrying its outputs `[start,
    stop)` (`heads.MixedTaskLoss`); class-incremental: every sample competes
    with every class seen so far, as it is scored."""
    if k == 0:
      return super().training_data(net, sequence, k, batch_size, seed=seed)
    task = sequence.tasks[k]
    widest = sequence.scenario == "class"
    seen = sequence.tasks[:k + 1]
    if task.streaming:
      parts = [(t.train_data, t.label_offset + t.start, t.start,
                task.stop if widest else t.stop, t.train_size, t.num_classes,
                t.name) for t in seen]
      return (pipelines.rehearsal_batches(parts, batch_size, seed), None,
              heads.MixedTaskLoss(), [])
    x = np.concatenate([t.x_train for t in seen])
    y = np.concatenate([
        np.stack([t.y_train + t.label_offset + t.start,
                  np.full(len(t.y_train), t.start),
                  np.full(len(t.y_train), task.stop if widest else t.stop)],
                 axis=1)
        for t in seen]).astype("int64")
    return x, y, heads.MixedTaskLoss(), []


def _accuracy(task):
  return heads.TaskAccuracy(task.start, task.stop, task.label_offset)


METHODS = {
    m.name: m for m in (
        Method("finetune", task_free=True),
        Method("mas", estimator="mas", slice_outputs=True, task_free=True),
        Method("local_mas", estimator="local_mas", slice_outputs=True),
        Method("l2", estimator="uniform"),
        Method("ewc", estimator="fisher", labels=True, slice_outputs=True),
        Method("online_ewc", estimator="fisher", labels=True,
               slice_outputs=True, accumulate="decay"),
        Method("si", estimator="path_integral", tracks_path=True),
        Distillation("lwf"),
        Rehearsal("joint"),
        Method("replay", task_aware=False, task_free=True),
        Method("mas_oracle", estimator="mas", task_aware=False,
               task_free=True),
    )
}


def names(task_free=False):
  """The methods a runner offers: with task boundaries, or without."""
  return tuple(name for name, m in METHODS.items()
               if (m.task_free if task_free else m.task_aware))


def get(name, task_free=False):
  """The `Method` called `name`, for a run with or without task boundaries.

  Raises:
    ValueError: for an unknown name, or one the run cannot use.
  """
  offered = names(task_free)
  if name not in offered:
    where = ("with --task_boundaries=none / run_stream" if task_free else
             "when task boundaries are given / run_sequence")
    raise ValueError(
        f"Invalid value for argument `method`. Expected one of "
        f"{list(offered)} {where}. Received: method={name!r}")
  return METHODS[name]


def training_data(method, net, sequence, k, batch_size, temperature=2.0,
                  seed=0, frozen=None):
  """`(x, y, loss, metrics)` to fit task `k` with `method` (a `Method`)."""
  return method.training_data(net, sequence, k, batch_size,
                              temperature=temperature, seed=seed,
                              frozen=frozen)
