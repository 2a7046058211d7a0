"""run_sequence: learn a task sequence one task after another.

For each task: `fit` (one call, epochs counted from the start of the
sequence), evaluate every task, consolidate on the task's training inputs
(labels dropped), checkpoint, export, log. Tasks of arrays and streaming
tasks (`tf.data` pipelines, `keras_mas.data.pipelines`) take the same path.
Checkpoints and resume live in `keras_mas.experiments.checkpoints`, data sources in
`keras_mas.data.sources`. The library reads no flags: the apps pass plain
arguments.
"""

import contextlib
import os
import shutil
import tempfile
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_mas.core import batch_statistics
from keras_mas.core import callbacks as callbacks_lib
from keras_mas.core import models
from keras_mas.core import preprocessing
from keras_mas.core import regularizers
from keras_mas.data import pipelines
from keras_mas.data import tasks as tasks_lib
from keras_mas.experiments import architectures
from keras_mas.experiments import checkpoints
from keras_mas.experiments import evaluation
from keras_mas.experiments import export as export_lib
from keras_mas.experiments import methods as methods_lib
from keras_mas.experiments import metrics as metrics_lib
from keras_mas.experiments import options
from keras_mas.experiments import preemption
from keras_mas.experiments import progress as progress_lib
from keras_mas.experiments import resumable

__all__ = ["METHODS", "format_matrix", "predict_logits", "run_sequence",
           "validate_learning_rate"]

METHODS = methods_lib.names(task_free=False)

# Training steps per call of the traced train step (`compile`'s
# `steps_per_execution`): on small tasks the Python driving each step costs
# more than the step (benchmarks/CHOICES.md).
_STEPS_PER_EXECUTION = 8

# Per model, what it was last compiled with: a later task with the same
# loss and metrics resets the optimizer instead of compiling, which would
# retrace.
_COMPILED_FOR = weakref.WeakKeyDictionary()

format_matrix = evaluation.format_matrix
predict_logits = evaluation.predict_logits


def run_sequence(sequence, workdir, method="mas", strength=0.1,
                 penalty_mode="gradient", epochs=10,
                 batch_size=32, learning_rate=1e-3, optimizer="adam",
                 model="mlp", hidden_units=128, weights=None,
                 freeze_backbone=False, importance_samples=None, alpha=0.5,
                 fisher="empirical", temperature=2.0, seed=0, resume=False,
                 strategy=None, importance_data=None, batch_norm="recompute",
                 lora_rank=None, checkpoint_seconds=60.0,
                 checkpoint_steps=None, stop=None, extra=None, verbose=1,
                 normalize_importance=None):
  """Trains `sequence` task by task and writes the results into `workdir`.

  Writes `results.json` (method, dataset, scenario, tasks, accuracy matrix
  `R[i][j]`, ACC, BWT, FWT, forgetting, configuration, and the seconds
  spent: `setup_s` before the first task, and per task `timings` of `fit_s`,
  `evaluate_s`, `consolidate_s` and `save_s` (checkpoint and export)),
  TensorBoard logs under `tensorboard/`, a checkpoint per task under
  `checkpoints/` and a SavedModel per task under `export/task_<k>/`.

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
    method: one of `METHODS` (see `keras_mas.experiments.methods`); `"finetune"` trains
      with no protection.
    strength: λ of the penalty (`lwf`: weight of the distillation term is
      1; `finetune`, `joint`: unused).
    penalty_mode: `"gradient"` or `"proximal"` (see
      `MASModel.penalty_mode`).
    epochs: epochs per task.
    batch_size: training batch size.
    learning_rate: optimizer learning rate.
    optimizer: a Keras optimizer name; a fresh one is made for each task, so
      no momentum from one task moves the weights during the next.
    model: an architecture name (see `architectures.build`), or the user's
      own built `keras.Model` to start from: it is copied (a `.keras`
      round trip), never trained in place, so that every run of a
      selection starts from the same weights; its input shape must be the
      tasks' and it must have at least `sequence.num_outputs` outputs.
    hidden_units: hidden width of the `mlp` and `cnn`.
    weights: local weights file for a `keras.applications` backbone, or
      None / `"none"` (random initialisation).
    freeze_backbone: keep a `keras.applications` backbone fixed.
    importance_samples: samples of each task used for importance (all if
      None).
    alpha: weight of the old importance in `online_ewc`'s decay.
    fisher: `"empirical"` (labels) or `"true"` (sampled) Fisher for EWC.
    temperature: distillation temperature of `lwf`.
    seed: seeds the model, the shuffles and every task's training.
    resume: continue from the last completed task in `workdir`.
    strategy: a `tf.distribute.Strategy` to train and measure importance
      under, or None. Under `MultiWorkerMirroredStrategy` every worker runs
      this function on the same data; only the chief writes into `workdir`
      (the others write to a temporary directory they delete).
    importance_data: the data a starting `model` was deployed on: its
      inputs, or `(inputs, labels)` with labels over the model's outputs.
      With a method that measures importance on data (`mas`, `local_mas`,
      `l2`, `ewc`, `online_ewc`, `mas_oracle`), Ω is measured on it before
      the first task (labels unused, except by `ewc`) and the anchors set,
      so that what the model knows is protected from the start. With any
      method, labels give `results["importance_data_accuracy"]`, the
      accuracy on it before the first task and after each: the baseline
      (`finetune`, `si`, `lwf`, ...) is compared on the same footing.
    batch_norm: what becomes of BatchNormalization's moving statistics
      after each task, one of `batch_statistics.POLICIES`: `"recompute"`
      (default: the population statistics of the task just learned,
      measured in one forward pass over its training inputs, at most
      `importance_samples` of them), `"accumulate"` (their mean over the
      tasks so far), `"first_task"` (kept from the first task, or as a
      starting `model` has them) or `"keras"` (Keras's moving averages as
      training left them). Models without BatchNormalization are
      unaffected.
    lora_rank: with the user's own KerasHub task `model`, enable LoRA of
      this rank on its backbone (`backbone.enable_lora`) before the first
      task: only the LoRA factors and the head train, and Ω and θ* are
      made for them alone. None: no LoRA.
    checkpoint_seconds: inside a task, write a checkpoint at the first epoch
      end at least this many seconds after the last one (0: every epoch
      end); `resume` continues from it, with the same results as an
      uninterrupted run. The default costs nothing on short tasks.
    checkpoint_steps: also write one every this many training steps, inside
      an epoch (for long epochs); None: only at epoch ends.
    stop: a `preemption.StopRequest` (set by SIGTERM or SIGINT under
      `preemption.on_signals`): once set, training ends after the step
      under way, a checkpoint is written there and
      `preemption.Preempted` is raised.
    extra: a JSON-serialisable dict recorded in `results.json` (e.g. flags).
    verbose: 0 silent, 1 progress bars and a line per task.
    normalize_importance: `MASModel.consolidate`'s `normalize`: None (Ω
      as measured) or `"mean"` / `"max"` (each task's Ω divided by it, so
      that one λ suits models whose Ω differ in scale).

  Returns:
    The results dict that was written to `results.json`.

  Raises:
    ValueError: before any training, for an invalid argument, an unwritable
      `workdir`, a `workdir` holding another run (without `resume`), or
      `resume` on a run of a different configuration.
    keras_mas.core.callbacks.TrainingDivergedError: if a task's training stops
      being finite; the checkpoints of the completed tasks are intact.
    keras_mas.experiments.preemption.Preempted: when `stop` was set.
  """
  entered = time.perf_counter()
  method_spec = methods_lib.get(method)
  statistics = batch_statistics.TaskStatistics(
      batch_norm, tasks_done=int(isinstance(model, keras.Model)))
  strength = regularizers.validate_strength(strength)
  if isinstance(weights, str) and weights.lower() == "none":
    weights = None
  _check_options(fisher=fisher, alpha=alpha, temperature=temperature,
                 penalty_mode=penalty_mode, epochs=epochs,
                 batch_size=batch_size, hidden_units=hidden_units,
                 learning_rate=learning_rate, optimizer=optimizer)
  model_name = _check_model(model, weights, freeze_backbone, sequence)
  _check_lora_rank(lora_rank, model)
  if (isinstance(checkpoint_seconds, bool)
      or not isinstance(checkpoint_seconds, (int, float, np.number))
      or not checkpoint_seconds >= 0):
    raise ValueError(
        "Invalid value for argument `checkpoint_seconds`. Expected a number "
        f">= 0. Received: checkpoint_seconds={checkpoint_seconds!r}")
  if checkpoint_steps is not None:
    options.positive_integers(checkpoint_steps=checkpoint_steps)
  _check_labels(sequence)
  _check_importance_samples(importance_samples, sequence)
  old_x, old_y = _check_importance_data(importance_data, sequence,
                                        method_spec, model)
  checkpoints.check_writable(workdir)

  config = {
      "dataset": sequence.dataset, "recipe": sequence.recipe,
      "scenario": sequence.scenario, "num_tasks": len(sequence),
      "method": method, "strength": strength, "penalty_mode": penalty_mode,
      "epochs": int(epochs),
      "batch_size": int(batch_size), "learning_rate": float(learning_rate),
      "optimizer": optimizer, "model": model_name,
      "hidden_units": int(hidden_units), "weights": weights,
      "freeze_backbone": bool(freeze_backbone),
      "importance_data": (None if old_x is None else
                          {"samples": len(old_x), "labels": old_y is not None}),
      "importance_samples": importance_samples, "alpha": float(alpha),
      "fisher": fisher, "temperature": float(temperature),
      "seed": int(seed), "batch_norm": batch_norm,
  }
  if lora_rank:
    config["lora_rank"] = int(lora_rank)
  if normalize_importance is not None:
    if normalize_importance not in models.NORMALIZATIONS:
      raise ValueError(
          "Invalid value for argument `normalize_importance`. Expected one "
          f"of {list(models.NORMALIZATIONS)}. Received: "
          f"normalize_importance={normalize_importance!r}")
    config["normalize_importance"] = normalize_importance
  scope = strategy.scope if strategy is not None else contextlib.nullcontext
  write_dir = (workdir if checkpoints.is_chief(strategy)
               else tempfile.mkdtemp(prefix="keras_mas_worker_"))
  # One run per workdir: a second one is refused at once; the OS frees the
  # lock when the process ends, however it ends.
  with checkpoints.workdir_lock(write_dir):
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
    start = (0, 0)  # (epoch, batch) of the first task to train.
    if in_task is not None:
      k_in, epoch_in, batch_in, path_in = in_task
      net, progress = _resume((k_in - 1, path_in), config, workdir,
                              write_dir, sequence, scope, verbose,
                              in_task_at=(epoch_in, batch_in))
      start = (epoch_in, batch_in)
    elif checkpoint is not None:
      net, progress = _resume(checkpoint, config, workdir, write_dir, sequence,
                              scope, verbose)
    if (checkpoint or in_task) is not None:
      statistics.tasks_done += progress.first_task
      if progress.first_task < len(sequence):
        progress.resumes.append({"task": progress.first_task,
                                 "epoch": start[0], "batch": start[1]})
    else:
      with scope():
        net = _initial_model(model, sequence, hidden_units, weights,
                             freeze_backbone, seed, lora_rank)
      progress = _Progress.start(net, sequence, batch_size, old_x, old_y)
      if old_x is not None and _measures_on_data(method_spec):
        _consolidate_deployed(net, method_spec, old_x, old_y, strength, alpha,
                              importance_samples, fisher,
                              normalize_importance)

    net.penalty_mode = penalty_mode
    if method_spec.tracks_path:
      net.track_path_integral()
    writer = tf.summary.create_file_writer(
        os.path.join(write_dir, "tensorboard"))
    exporter = export_lib.ServingExport(net, sequence.input_shape,
                                        text=sequence.text)
    setup_s = time.perf_counter() - entered
    for k in range(progress.first_task, len(sequence)):
      task = sequence.tasks[k]
      first = start if k == progress.first_task else (0, 0)
      if stop is not None and stop.is_set():
        raise preemption.Preempted(stop.reason, k, resumable.resumes_from(k, None))
      started = time.perf_counter()
      keras.utils.set_random_seed(seed * 1009 + k)
      statistics.before_task(net)
      in_task_checkpoints = resumable.InTaskCheckpoint(
          write_dir, k, epochs, first, checkpoint_seconds, checkpoint_steps,
          stop, lambda: {"config": config, **progress.state()})
      _fit(net, method_spec, sequence, k, scope, optimizer, learning_rate,
           epochs, batch_size, temperature, seed, write_dir, writer, verbose,
           first=first, extra_callbacks=[in_task_checkpoints])
      if stop is not None and stop.is_set():
        raise preemption.Preempted(
            stop.reason, k, resumable.resumes_from(k, in_task_checkpoints.last))
      statistics.after_task(net, _training_inputs(net, task, batch_size),
                            importance_samples)
      trained = time.perf_counter()
      progress.matrix[k] = evaluation.task_accuracies(net, sequence,
                                                      batch_size, trained=k)
      evaluated = time.perf_counter()
      if method_spec.estimator is not None:
        net.consolidate(
            method_spec.consolidation_data(task, sequence.input_shape),
            **method_spec.consolidation(task, strength, alpha,
                                        importance_samples, fisher,
                                        normalize_importance))
        callbacks_lib.log_importance(writer, net, step=k)
      consolidated = time.perf_counter()
      progress.record(k, _old_accuracy(net, old_x, old_y, batch_size),
                      fit_s=trained - started,
                      evaluate_s=evaluated - trained,
                      consolidate_s=consolidated - evaluated)
      so_far = progress.summary(k)
      callbacks_lib.log_accuracy_matrix(writer, progress.matrix, so_far, step=k,
                                        image=k == len(sequence) - 1)
      writer.flush()
      checkpoints.write(write_dir, k, net, {"config": config,
                                            **progress.state()})
      checkpoints.remove_in_task(write_dir)
      _export(exporter, write_dir, sequence, k)
      # Known only once the checkpoint holding this task's timings is written.
      progress.timings[-1]["save_s"] = time.perf_counter() - consolidated
      if verbose:
        seen = " ".join(f"{a:.3f}" for a in progress.matrix[k, :k + 1])
        print(f"task {k} ({task.name}): accuracy on tasks 0..{k}: {seen}  "
              f"ACC {so_far['acc']:.3f}  "
              f"forgetting {so_far['forgetting']:.3f}  "
              f"fit {trained - started:.1f}s  consolidate "
              f"{consolidated - evaluated:.1f}s")
    writer.close()

    results = evaluation.results(
        method, sequence, progress.matrix, progress.baseline, config,
        extra=extra or {}, timings=progress.timings,
        resumes=progress.resumes, setup_s=setup_s)
    if progress.deployed is not None:
      results["importance_data_accuracy"] = progress.deployed
    checkpoints.write_json(os.path.join(write_dir, "results.json"), results)
    if write_dir != workdir:
      shutil.rmtree(write_dir, ignore_errors=True)
    if verbose:
      print(format_matrix(results))
    return results


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


def _resume(checkpoint, config, workdir, write_dir, sequence, scope,
            verbose, in_task_at=None):
  """The model and progress of the run in `workdir`, checked against `config`."""
  k, path = checkpoint
  state = checkpoints.read_state(path)
  # Runs made before the option existed kept Keras's moving averages.
  checkpoints.check_config(
      {"batch_norm": "keras", **(state.get("config") or {})}, config, workdir)
  with scope():
    net = checkpoints.load_model(path)
  checkpoints.remove_partial_writes(write_dir)
  if k >= 0 and not os.path.isdir(
      os.path.join(write_dir, "export", f"task_{k}")):
    # Stopped mid-export.
    _export(export_lib.ServingExport(net, sequence.input_shape,
                                     text=sequence.text),
            write_dir, sequence, k)
  if verbose:
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


def _initial_model(model, sequence, hidden_units, weights, freeze_backbone,
                   seed, lora_rank=None):
  if isinstance(model, keras.Model):
    # The copy's new random-seed states (dropout's) and LoRA factors.
    keras.utils.set_random_seed(seed)
    copy = checkpoints.copy_model(model, wrap=False)
    if lora_rank:
      copy.backbone.enable_lora(lora_rank)
    return models.MASModel.from_model(copy)
  return architectures.build(model, sequence.input_shape,
                             sequence.num_outputs, hidden_units=hidden_units,
                             weights=weights,
                             freeze_backbone=freeze_backbone, seed=seed)


def _fit(net, method_spec, sequence, k, scope, optimizer, learning_rate, epochs,
         batch_size, temperature, seed, write_dir, writer, verbose,
         first=(0, 0), extra_callbacks=()):
  """Task `k`'s training, with a fresh optimizer state.

  Arrays are batched by `pipelines.array_batches`; a streaming task's
  pipeline comes batched. From `first` = `(epoch, batch)` past the start
  (resumed inside the task) the model keeps the optimizer state it was
  loaded with, and `resumable.fit_task` skips what was trained.
  """
  x, y, loss, task_metrics = method_spec.training_data(
      net, sequence, k, batch_size, temperature=temperature,
      seed=seed * 1009 + k)
  compiled_for = (optimizer, learning_rate, keras.saving.serialize_keras_object(
      [loss] + task_metrics))
  if first != (0, 0):
    pass  # Loaded with its optimizer's state, mid-task.
  elif net.compiled and _COMPILED_FOR.get(net) == compiled_for:
    # The same loss and metrics as the last task's: fresh optimizer state
    # without `compile`, which would retrace train, test and predict.
    net.reset_optimizer()
  else:
    with scope():
      net.compile(
          optimizer=keras.optimizers.get(
              {"class_name": optimizer,
               "config": {"learning_rate": learning_rate}}),
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
    x = pipelines.array_batches(x, y, batch_size, seed * 1009 + k)
  resumable.fit_task(net, x, k, epochs, first, verbose, write_dir, writer,
                     extra_callbacks)


def _check_options(fisher, alpha, temperature, penalty_mode, epochs,
                   batch_size, hidden_units, learning_rate, optimizer):
  """Raises ValueError, naming it, for an invalid plain-valued argument."""
  if fisher not in ("empirical", "true"):
    raise ValueError(
        "Invalid value for argument `fisher`. Expected 'empirical' or "
        f"'true'. Received: fisher={fisher!r}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(
        "Invalid value for argument `alpha`. Expected a number in [0, 1]. "
        f"Received: alpha={alpha!r}")
  if not temperature > 0:
    raise ValueError(
        "Invalid value for argument `temperature`. Expected a number > 0. "
        f"Received: temperature={temperature!r}")
  if penalty_mode not in models.PENALTY_MODES:
    raise ValueError(
        "Invalid value for argument `penalty_mode`. Expected one of "
        f"{list(models.PENALTY_MODES)}. Received: "
        f"penalty_mode={penalty_mode!r}")
  options.positive_integers(epochs=epochs, batch_size=batch_size,
                            hidden_units=hidden_units)
  options.check_optimizer(optimizer, learning_rate)


validate_learning_rate = options.validate_learning_rate


def _check_model(model, weights, freeze_backbone, sequence):
  """The model's name for the configuration; raises if it cannot serve."""
  if not isinstance(model, keras.Model):
    architectures.check_options(model, weights, freeze_backbone)
    return model
  _check_model_fits(model, sequence)
  model_name = f"custom:{model.name}"
  if weights is not None or freeze_backbone:
    raise ValueError(
        "Invalid value for argument `weights`/`freeze_backbone`. Expected "
        "them only with a keras.applications backbone. Received: "
        f"model={model_name!r}, weights={weights!r}, "
        f"freeze_backbone={freeze_backbone!r}")
  return model_name


def _check_lora_rank(lora_rank, model):
  """Raises unless `lora_rank` is None or a rank for a KerasHub backbone."""
  if lora_rank is None:
    return
  if (isinstance(lora_rank, bool) or
      not isinstance(lora_rank, (int, np.integer)) or lora_rank < 1):
    raise ValueError(
        "Invalid value for argument `lora_rank`. Expected a positive "
        f"integer. Received: lora_rank={lora_rank!r}")
  backbone = getattr(model, "backbone", None)
  if not hasattr(backbone, "enable_lora"):
    raise ValueError(
        "Invalid value for argument `lora_rank`. Expected the user's KerasHub "
        "task model, whose backbone has `enable_lora`. Received: model="
        f"{getattr(model, 'name', model)!r}")


def _check_importance_samples(importance_samples, sequence):
  if importance_samples is None:
    return
  # A pipeline of unknown size is checked when importance reads it.
  smallest = min([t.train_size for t in sequence.tasks
                  if t.train_size is not None] or [importance_samples])
  if (not isinstance(importance_samples, (int, np.integer))
      or not 1 <= importance_samples <= smallest):
    raise ValueError(
        "Invalid value for argument `importance_samples`. Expected an "
        f"integer from 1 to {smallest}, the smallest task's training set. "
        f"Received: importance_samples={importance_samples!r}")


def _check_model_fits(model, sequence):
  """Raises unless `model` takes the tasks' inputs and has their outputs."""
  preprocessor = getattr(model, "preprocessor", None)
  if preprocessor is not None:
    _check_preprocessor_takes(model, preprocessor, sequence)
  elif sequence.text:
    raise ValueError(
        "Invalid value for argument `model`. Expected a model with a "
        "preprocessor that takes text (a KerasHub task such as a "
        "TextClassifier) for tasks of text. Received: model "
        f"{model.name!r} without a preprocessor")
  elif not model.built or len(model.inputs or []) != 1:
    raise ValueError(
        "Invalid value for argument `model`. Expected a built keras.Model "
        "with one image input. Received: "
        f"{'an unbuilt' if not model.built else 'a multi-input'} model "
        f"{model.name!r}")
  expected = tuple(sequence.input_shape)
  taken = (expected if preprocessor is not None else
           tuple(model.inputs[0].shape[1:]))
  if len(taken) != len(expected) or any(
      t is not None and t != e for t, e in zip(taken, expected)):
    raise ValueError(
        "Invalid value for argument `model`. Expected a model taking inputs "
        f"of shape {expected}, the tasks' (resize the data, or pass "
        f"image_size to the source). Received: model {model.name!r} taking "
        f"{taken}")
  outputs = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
  if outputs is None or outputs < sequence.num_outputs:
    raise ValueError(
        "Invalid value for argument `model`. Expected one output of at "
        f"least {sequence.num_outputs} logits, as the "
        f"{sequence.scenario}-incremental sequence needs. Received: model "
        f"{model.name!r} with output shapes "
        f"{[tuple(o.shape) for o in model.outputs]}")


def _check_preprocessor_takes(model, preprocessor, sequence):
  """Raises unless `preprocessor` takes a training input of the first task."""
  task = sequence.tasks[0]
  sample = (next(iter(task.train_data.take(1).batch(1)))[0]
            if task.streaming else task.x_train[:1])
  kind = "text" if sequence.text else "images"
  try:
    preprocessor(sample)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `model`. Expected a model whose "
        f"preprocessor takes the tasks' inputs ({kind}). Received: model "
        f"{model.name!r} with a {type(preprocessor).__name__}, which fails "
        f"on them ({type(e).__name__}: {str(e)[:200]})") from e


def _check_labels(sequence):
  """Raises, naming them, for labels outside a task's classes."""
  for k, task in enumerate(sequence.tasks):
    if task.streaming:
      continue  # Checked by `tasks.from_datasets`, and as they stream.
    for split, y in (("train", task.y_train), ("test", task.y_test)):
      y = np.asarray(y)
      bad = y[(y < 0) | (y >= task.num_classes)] if y.size else y
      if bad.size or y.ndim != 1:
        raise ValueError(
            "Invalid value for argument `sequence`. Expected integer labels "
            f"0..{task.num_classes - 1} in task {k} ({task.name!r}). "
            f"Received: {split} labels "
            + (f"of shape {y.shape}" if y.ndim != 1 else
               f"{sorted(set(bad.tolist()))[:10]} out of range"))


def _check_importance_data(data, sequence, method_spec, model):
  """`(x, y)` of `importance_data` (y may be None), checked before training."""
  if data is None:
    return None, None
  x, y = data if isinstance(data, tuple) else (data, None)
  x = np.asarray(x)
  if (x.ndim != 1 + len(sequence.input_shape) or not len(x)
      or tuple(x.shape[1:]) != tuple(sequence.input_shape)
      or _is_text(x) != sequence.text):
    raise ValueError(
        "Invalid value for argument `importance_data`. Expected inputs of "
        f"the tasks' shape {tuple(sequence.input_shape)}. Received: inputs "
        f"of shape {x.shape}")
  if y is not None:
    y = np.asarray(y)
    outputs = (model.outputs[0].shape[-1] if isinstance(model, keras.Model)
               else sequence.num_outputs)
    if y.shape != (len(x),) or y.min() < 0 or y.max() >= outputs:
      raise ValueError(
          "Invalid value for argument `importance_data`. Expected one label "
          f"per input in 0..{outputs - 1}. Received: labels of shape "
          f"{y.shape}" + (f", range {y.min()}..{y.max()}" if y.size else ""))
  elif method_spec.labels:
    raise ValueError(
        "Invalid value for argument `importance_data`. Expected labels, "
        f"`(inputs, labels)`, for method={method_spec.name!r}, whose "
        "importance reads them. Received: inputs only")
  return (x if sequence.text else x.astype("float32")), y


def _is_text(x):
  return x.dtype == object or x.dtype.kind in "US"


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


def _consolidate_deployed(net, method_spec, x, y, strength, alpha, num_samples,
                          fisher, normalize=None):
  """Ω on the data the model was deployed on, over all its outputs."""
  inner = net.model if isinstance(net, models.WrappedMASModel) else net
  outputs = int(inner.outputs[0].shape[-1])
  deployed = tasks_lib.Task(
      "importance data", x, np.zeros(len(x), "int64") if y is None else y,
      x[:0], np.zeros(0, "int64"), outputs, 0, outputs, 0)
  net.consolidate(method_spec.consolidation_data(deployed),
                  **method_spec.consolidation(
                      deployed, strength, alpha,
                      None if num_samples is None else min(num_samples,
                                                           len(x)),
                      fisher, normalize))


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
