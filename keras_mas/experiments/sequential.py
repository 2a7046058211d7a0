"""run_sequence: learn a task sequence one task after another.

For each task: `fit` (one call, epochs counted from the start of the
sequence), evaluate every task, consolidate on the task's training inputs
(labels dropped), checkpoint, export, log. Tasks of arrays and streaming
tasks (`tf.data` pipelines, `keras_mas.data.pipelines`) take the same path.
The run's settings are one `configs.SequenceRun`, recorded in
`results.json` and compared on resume; what depends on the data is checked
in `sequence_checks`. Checkpoints and resume live in
`keras_mas.experiments.checkpoints`, data sources in `keras_mas.data.sources`.
The library reads no flags: the apps fill a `SequenceRun` from theirs.
"""

import contextlib
import dataclasses
import os
import shutil
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_mas.core import batch_statistics
from keras_mas.core import callbacks as callbacks_lib
from keras_mas.core import model_parallel
from keras_mas.core import models
from keras_mas.core import preprocessing
from keras_mas.data import pipelines
from keras_mas.data import tasks as tasks_lib
from keras_mas.experiments import architectures
from keras_mas.experiments import checkpoints
from keras_mas.experiments import configs
from keras_mas.experiments import evaluation
from keras_mas.experiments import export as export_lib
from keras_mas.experiments import methods as methods_lib
from keras_mas.experiments import metrics as metrics_lib
from keras_mas.experiments import options
from keras_mas.experiments import preemption
from keras_mas.experiments import progress as progress_lib
from keras_mas.experiments import resumable
from keras_mas.experiments import sequence_checks as checks

__all__ = ["METHODS", "SequenceRun", "format_matrix", "predict_logits",
           "run_sequence", "validate_learning_rate"]

METHODS = methods_lib.names(task_free=False)

# Training steps per call of the traced train step (`compile`'s
# `steps_per_execution`): on small tasks the Python driving each step costs
# more than the step (benchmarks/CHOICES.md).
_STEPS_PER_EXECUTION = 8

# Per model, what it was last compiled with: a later task with the same
# loss and metrics resets the optimizer instead of compiling, which would
# retrace.
_COMPILED_FOR = weakref.WeakKeyDictionary()

SequenceRun = configs.SequenceRun
format_matrix = evaluation.format_matrix
predict_logits = evaluation.predict_logits


def run_sequence(sequence, workdir, run=None, *, model=None,
                 importance_data=None, resume=False, strategy=None, stop=None,
                 extra=None, verbose=1, **settings):
  """Trains `sequence` task by task and writes the results into `workdir`.

  Writes `results.json` (method, dataset, scenario, tasks, accuracy matrix
  `R[i][j]`, ACC, BWT, FWT, forgetting, `run`'s settings as `config`, and
  the seconds spent: `setup_s` before the first task, and per task
  `timings` of `fit_s`, `evaluate_s`, `consolidate_s` and `save_s`
  (checkpoint and export)), TensorBoard logs under `tensorboard/`, a
  checkpoint per task under `checkpoints/` and a SavedModel per task under
  `export/task_<k>/` (the last task's only, or none, as `run.export` says).

  Example:

  ```python
  sequence = keras_mas.data.tasks.make_sequence("digits", "permuted", "domain", 3)
  results = keras_mas.experiments.sequential.run_sequence(sequence, "/tmp/run", epochs=5)
  print(results["acc"], results["forgetting"])
  ```

  Args:
    sequence: a `keras_mas.data.tasks.TaskSequence`: arrays, or `tf.data`
      pipelines (`tasks.from_datasets`, `tasks.from_spec`) that are read
      batch by batch and never held whole (see `keras_mas.data.pipelines`).
    workdir: output directory; created if needed.
    run: a `keras_mas.experiments.configs.SequenceRun`, the run's settings
      (None: its defaults).
    model: the user's own built `keras.Model` to start from, instead of
      `run.model`'s architecture: it is copied (a `.keras` round trip),
      never trained in place, so that every run of a selection starts from
      the same weights; its input shape must be the tasks' and it must have
      at least `sequence.num_outputs` outputs. An architecture name here
      is `run.model`.
    importance_data: the data a starting `model` was deployed on: its
      inputs, or `(inputs, labels)` with labels over the model's outputs.
      With a method that measures importance on data (`mas`, `local_mas`,
      `l2`, `ewc`, `online_ewc`, `mas_oracle`), Ω is measured on it before
      the first task (labels unused, except by `ewc`) and the anchors set,
      so that what the model knows is protected from the start. With any
      method, labels give `results["importance_data_accuracy"]`, the
      accuracy on it before the first task and after each: the baseline
      (`finetune`, `si`, `lwf`, ...) is compared on the same footing.
    resume: continue from the last completed task in `workdir` (or from
      inside the task under way, where an in-task checkpoint was written).
    strategy: a `tf.distribute.Strategy` to train and measure importance
      under, or None. Under `MultiWorkerMirroredStrategy` every worker runs
      this function on the same data; only the chief writes into `workdir`
      (the others write to a temporary directory they delete).
    stop: a `preemption.StopRequest` (set by SIGTERM or SIGINT under
      `preemption.on_signals`): once set, training ends after the step
      under way, a checkpoint is written there and
      `preemption.Preempted` is raised.
    extra: a JSON-serialisable dict recorded in `results.json` (e.g. flags).
    verbose: 0 silent, 1 progress bars and a line per task.
    **settings: `SequenceRun` fields that replace `run`'s:
      `run_sequence(s, d, epochs=5)` is
      `run_sequence(s, d, SequenceRun(epochs=5))`.

  Returns:
    The results dict that was written to `results.json`.

  Raises:
    ValueError: before any training, for an invalid argument or setting, an
      unwritable `workdir`, a `workdir` holding another run (without
      `resume`), or `resume` on a run of different settings.
    keras_mas.core.callbacks.TrainingDivergedError: if a task's training stops
      being finite; the checkpoints of the completed tasks are intact.
    keras_mas.experiments.preemption.Preempted: when `stop` was set.
  """
  entered = time.perf_counter()
  if isinstance(model, str):
    settings["model"], model = model, None
  run = dataclasses.replace(run or configs.SequenceRun(), **settings)
  method_spec = methods_lib.get(run.method)
  old_x, old_y = checks.check_run(run, sequence, model, importance_data)
  model_parallel.check_batch_size(run.batch_size)
  checkpoints.check_writable(workdir)
  config = {
      "dataset": sequence.dataset, "recipe": sequence.recipe,
      "scenario": sequence.scenario, "num_tasks": len(sequence),
      **run.recorded(),
      "model": run.model if model is None else f"custom:{model.name}",
      "importance_data": (None if old_x is None else
                          {"samples": len(old_x), "labels": old_y is not None}),
  }
  context = _Context(run, sequence, method_spec, config, workdir, strategy,
                     stop, verbose)
  # One run per workdir: a second one is refused at once; the OS frees the
  # lock when the process ends, however it ends.
  with checkpoints.workdir_lock(context.write_dir):
    net, progress, start, statistics = _start(context, model, resume, old_x,
                                              old_y)
    net.penalty_mode = run.penalty_mode
    if method_spec.tracks_path:
      net.track_path_integral()
    context.writer = tf.summary.create_file_writer(
        os.path.join(context.write_dir, "tensorboard"))
    exporter = export_lib.ServingExport(net, sequence.input_shape,
                                        text=sequence.text)
    setup_s = time.perf_counter() - entered
    for k in range(progress.first_task, len(sequence)):
      _learn_task(context, net, k, progress, statistics, exporter, old_x,
                  old_y, first=start if k == progress.first_task else (0, 0))
    context.writer.close()
    results = evaluation.results(
        run.method, sequence, progress.matrix, progress.baseline, config,
        extra=extra or {}, timings=progress.timings,
        resumes=progress.resumes, setup_s=setup_s)
    if progress.deployed is not None:
      results["importance_data_accuracy"] = progress.deployed
    checkpoints.write_json(os.path.join(context.write_dir, "results.json"),
                           results)
    if context.write_dir != workdir:
      shutil.rmtree(context.write_dir, ignore_errors=True)
    if verbose:
      print(format_matrix(results))
    return results


class _Context:
  """What every step of one `run_sequence` call reads."""

  def __init__(self, run, sequence, method_spec, config, workdir, strategy,
               stop, verbose):
    self.run, self.sequence, self.method_spec = run, sequence, method_spec
    self.config, self.workdir, self.stop = config, workdir, stop
    self.verbose = verbose
    self.scope = (strategy.scope if strategy is not None
                  else contextlib.nullcontext)
    self.write_dir = checkpoints.write_dir(workdir, strategy)
    self.writer = None


def _start(context, model, resume, old_x, old_y):
  """`(net, progress, (epoch, batch) to start at, statistics)`: resumed
  from `workdir`'s checkpoints, or a new model (consolidated on the
  importance data where the method measures on data)."""
  run, sequence, workdir = context.run, context.sequence, context.workdir
  statistics = batch_statistics.TaskStatistics(
      run.batch_norm, tasks_done=int(model is not None))
  checkpoint = checkpoints.latest(workdir)
  in_task = checkpoints.latest_in_task(workdir)
  if in_task is not None and in_task[0] != (
      checkpoint[0] + 1 if checkpoint is not None else 0):
    in_task = None  # Left from before the last task's own checkpoint.
  if (checkpoint or in_task) is not None and not resume:
    raise ValueError(
        f"Invalid value for argument `workdir`. Expected a directory without "
        f"checkpoints, or resume=True to continue the run in it. Received: "
        f"workdir={workdir!r} holding {(in_task or checkpoint)[-1]}")
  if (checkpoint or in_task) is None:
    with context.scope():
      net = _initial_model(model, sequence, run)
    progress = _Progress.start(net, sequence, run.batch_size, old_x, old_y)
    if old_x is not None and _measures_on_data(context.method_spec):
      _consolidate_deployed(net, context.method_spec, old_x, old_y, run)
    return net, progress, (0, 0), statistics
  start = (0, 0)
  if in_task is not None:
    k_in, epoch_in, batch_in, path_in = in_task
    net, progress = _resume(context, (k_in - 1, path_in),
                            in_task_at=(epoch_in, batch_in))
    start = (epoch_in, batch_in)
  else:
    net, progress = _resume(context, checkpoint)
  statistics.tasks_done += progress.first_task
  if progress.first_task < len(sequence):
    progress.resumes.append({"task": progress.first_task,
                             "epoch": start[0], "batch": start[1]})
  return net, progress, start, statistics


def _learn_task(context, net, k, progress, statistics, exporter, old_x,
                old_y, first):
  """Task `k`: fit from `first` = `(epoch, batch)`, measure, consolidate,
  checkpoint, export, log."""
  run, sequence, stop = context.run, context.sequence, context.stop
  task = sequence.tasks[k]
  if stop is not None and stop.is_set():
    raise preemption.Preempted(stop.reason, k, resumable.resumes_from(k, None))
  started = time.perf_counter()
  keras.utils.set_random_seed(run.seed * 1009 + k)
  statistics.before_task(net)
  in_task_checkpoints = resumable.InTaskCheckpoint(
      context.write_dir, k, run.epochs, first, run.checkpoint_seconds,
      run.checkpoint_steps, stop,
      lambda: {"config": context.config, **progress.state()})
  _fit(context, net, k, first=first, extra_callbacks=[in_task_checkpoints])
  if stop is not None and stop.is_set():
    raise preemption.Preempted(
        stop.reason, k, resumable.resumes_from(k, in_task_checkpoints.last))
  statistics.after_task(net, _training_inputs(net, task, run.batch_size),
                        run.importance_samples)
  trained = time.perf_counter()
  progress.matrix[k] = evaluation.task_accuracies(net, sequence,
                                                  run.batch_size, trained=k)
  evaluated = time.perf_counter()
  if context.method_spec.estimator is not None:
    net.consolidate(
        context.method_spec.consolidation_data(task, sequence.input_shape),
        **_consolidation(context.method_spec, task, run))
    if run.importance_histograms:
      callbacks_lib.log_importance(context.writer, net, step=k)
  consolidated = time.perf_counter()
  progress.record(k, _old_accuracy(net, old_x, old_y, run.batch_size),
                  fit_s=trained - started, evaluate_s=evaluated - trained,
                  consolidate_s=consolidated - evaluated)
  so_far = progress.summary(k)
  callbacks_lib.log_accuracy_matrix(context.writer, progress.matrix, so_far,
                                    step=k, image=k == len(sequence) - 1)
  context.writer.flush()
  checkpoints.write(context.write_dir, k, net,
                    {"config": context.config, **progress.state()})
  checkpoints.remove_in_task(context.write_dir)
  if _exported(run, sequence, k):
    _export(exporter, context.write_dir, sequence, k)
  # Known only once the checkpoint holding this task's timings is written.
  progress.timings[-1]["save_s"] = time.perf_counter() - consolidated
  if context.verbose:
    seen = " ".join(f"{a:.3f}" for a in progress.matrix[k, :k + 1])
    print(f"task {k} ({task.name}): accuracy on tasks 0..{k}: {seen}  "
          f"ACC {so_far['acc']:.3f}  forgetting {so_far['forgetting']:.3f}  "
          f"fit {trained - started:.1f}s  consolidate "
          f"{consolidated - evaluated:.1f}s")


def _consolidation(method_spec, task, run, num_samples=None):
  """`consolidate`'s keyword arguments for `task` under `run`'s settings."""
  return method_spec.consolidation(
      task, run.strength, run.alpha,
      run.importance_samples if num_samples is None else num_samples,
      run.fisher, run.normalize_importance)


class _Progress(progress_lib.Progress):
  """A classifier run's progress: accuracies."""

  @classmethod
  def start(cls, net, sequence, batch_size, old_x=None, old_y=None):
    old = _old_accuracy(net, old_x, old_y, batch_size)
    return cls.new(evaluation.task_accuracies(net, sequence, batch_size),
                   None if old is None else [old])

  def summary(self, k):
    return metrics_lib.summarize(self.matrix[:k + 1, :k + 1],
                                 self.baseline[:k + 1])


def _resume(context, checkpoint, in_task_at=None):
  """The model and progress of the run in `workdir`, checked against its
  configuration."""
  k, path = checkpoint
  sequence, workdir, write_dir = (context.sequence, context.workdir,
                                  context.write_dir)
  state = checkpoints.read_state(path)
  # Runs made before the option existed kept Keras's moving averages.
  checkpoints.check_config(
      {"batch_norm": "keras", **(state.get("config") or {})}, context.config,
      workdir)
  with context.scope():
    net = checkpoints.load_model(path)
  checkpoints.remove_partial_writes(write_dir)
  if (k >= 0 and _exported(context.run, sequence, k) and not os.path.isdir(
      os.path.join(write_dir, "export", f"task_{k}"))):
    # Stopped mid-export.
    _export(export_lib.ServingExport(net, sequence.input_shape,
                                     text=sequence.text),
            write_dir, sequence, k)
  if context.verbose:
    if in_task_at is not None:
      print(f"Resuming inside task {k + 1} at epoch {in_task_at[0]}, batch "
            f"{in_task_at[1]} from {path}")
    elif k == len(sequence) - 1:
      print(f"The run in {workdir} is complete: all {len(sequence)} tasks "
            "were trained. Its results:")
    else:
      print(f"Resuming after task {k} from {path}")
  return net, _Progress.from_state(k, state)


def _training_inputs(net, task, batch_size):
  """A task's training inputs as the model takes them, in training-sized
  batches for a pipeline or a model with a preprocessor."""
  if not task.streaming:
    x = task.x_train
  else:
    x = task.train_data.batch(batch_size).map(lambda x, y: x)
  if net.preprocessor is not None:
    x = preprocessing.preprocessed(
        net.preprocessor, x, batch_size=None if task.streaming else batch_size,
        inputs_only=True)
  return x


def _initial_model(model, sequence, run):
  if model is not None:
    # The copy's new random-seed states (dropout's) and LoRA factors.
    keras.utils.set_random_seed(run.seed)
    copy = checkpoints.copy_model(model, wrap=False)
    if run.lora_rank:
      copy.backbone.enable_lora(run.lora_rank)
    return models.MASModel.from_model(copy)
  return architectures.build(run.model, sequence.input_shape,
                             sequence.num_outputs,
                             hidden_units=run.hidden_units,
                             weights=run.weights,
                             freeze_backbone=run.freeze_backbone,
                             seed=run.seed)


def _fit(context, net, k, first=(0, 0), extra_callbacks=()):
  """Task `k`'s training, with a fresh optimizer state.

  Arrays are batched by `pipelines.array_batches`; a streaming task's
  pipeline comes batched. From `first` = `(epoch, batch)` past the start
  (resumed inside the task) the model keeps the optimizer state it was
  loaded with, and `resumable.fit_task` skips what was trained.
  """
  run = context.run
  x, y, loss, task_metrics = context.method_spec.training_data(
      net, context.sequence, k, run.batch_size, temperature=run.temperature,
      seed=run.seed * 1009 + k)
  compiled_for = (run.optimizer, run.learning_rate,
                  keras.saving.serialize_keras_object([loss] + task_metrics))
  if first != (0, 0):
    pass  # Loaded with its optimizer's state, mid-task.
  elif net.compiled and _COMPILED_FOR.get(net) == compiled_for:
    # The same loss and metrics as the last task's: fresh optimizer state
    # without `compile`, which would retrace train, test and predict.
    net.reset_optimizer()
  else:
    with context.scope():
      net.compile(
          optimizer=keras.optimizers.get(
              {"class_name": run.optimizer,
               "config": {"learning_rate": run.learning_rate}}),
          loss=loss, metrics=task_metrics,
          # Several steps per call of the traced train step: on small tasks
          # the Python driving each step costs more than the step itself.
          # Callbacks here act per epoch, so they see no difference. Not
          # under a strategy: Keras 3.15's loop of steps fails across
          # replicas ("You must feed a value for placeholder tensor",
          # keras-team/keras#19246). Not on PyTorch, whose Keras trainer
          # runs one eager step per call.
          steps_per_execution=(
              1 if getattr(net, "_distribute_strategy", None) is not None
              or keras.backend.backend() == "torch"
              else _STEPS_PER_EXECUTION))
  _COMPILED_FOR[net] = compiled_for
  if y is not None:
    x = pipelines.array_batches(
        x, y, run.batch_size, run.seed * 1009 + k,
        multiple_of=model_parallel.data_parallel_size())
  resumable.fit_task(net, x, k, run.epochs, first, context.verbose,
                     context.write_dir, context.writer, extra_callbacks)


validate_learning_rate = options.validate_learning_rate


def _old_accuracy(net, x, y, batch_size):
  """Accuracy on the labelled importance data; None without labels."""
  if x is None or y is None:
    return None
  logits = predict_logits(net, x, batch_size)
  return float(np.mean(np.argmax(logits, axis=-1) == y))


def _measures_on_data(method_spec):
  """Whether the method's importance is measured on data (not on the path
  of training, as SI's, nor absent, as fine-tuning's)."""
  return method_spec.estimator not in (None, "path_integral")


def _consolidate_deployed(net, method_spec, x, y, run):
  """Ω on the data the model was deployed on, over all its outputs."""
  inner = net.model if isinstance(net, models.WrappedMASModel) else net
  outputs = int(inner.outputs[0].shape[-1])
  deployed = tasks_lib.Task(
      "importance data", x, np.zeros(len(x), "int64") if y is None else y,
      x[:0], np.zeros(0, "int64"), outputs, 0, outputs, 0)
  net.consolidate(method_spec.consolidation_data(deployed),
                  **_consolidation(method_spec, deployed, run, num_samples=(
                      None if run.importance_samples is None
                      else min(run.importance_samples, len(x)))))


def _exported(run, sequence, k):
  """Whether task `k`'s model is exported under `run.export`."""
  return (run.export == "every_task"
          or run.export == "last" and k == len(sequence) - 1)


def _export(exporter, workdir, sequence, k):
  """Task `k`'s SavedModel, through `exporter` (an `export.ServingExport`)."""
  tasks = sequence.tasks[:k + 1]
  stop = max(t.stop for t in tasks)
  heads_so_far = ({f"task_{i}": t.output_slice for i, t in enumerate(tasks)}
                  if sequence.scenario == "task" else {})
  if sequence.scenario != "domain":
    heads_so_far["seen"] = (0, stop)
  exporter.write(os.path.join(workdir, "export", f"task_{k}"),
                 heads=heads_so_far)
