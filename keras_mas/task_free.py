"""Task-free MAS: learn a stream whose distribution drifts, with no task ids.

Aljundi, Kelchtermans and Tuytelaars, "Task-Free Continual Learning", CVPR
2019. Nobody says when a task ends. The model learns online from the
stream's small batches, each rehearsed with a small buffer of the hardest
recent samples (`HardBuffer`). A sliding window of recent losses
(`LossWindow`) tells when to consolidate: a rise of the window's mean well
above the last plateau is a *peak* (the distribution changed); after a peak,
a window whose mean and variance both fall below thresholds is a *plateau*
(something new has been learned). At each plateau, MAS importance is
measured on the buffer, accumulated into Ω, and θ* ← θ
(`MASModel.consolidate`).

Keras-native: one `model.fit` over the stream. `HardBuffer` is the
model's `rehearsal` (`MASModel.rehearsal`): it is joined to each batch and
updated inside the traced train step, so `fit`'s metrics are prequential
(test-then-train). `TaskFreeConsolidation`, a Keras callback, sets it,
keeps the window and consolidates; `fit_stream` is `model.fit` with it;
`run_stream` turns a task sequence into one stream with hidden boundaries
(`keras_mas.streams`) and scores task-free MAS against online fine-tuning,
experience replay and MAS at the true boundaries. Every piece keeps its
state as plain values (`get_state` / `set_state`) so that a checkpoint can
hold it beside the model. `LossWindow` lives in `keras_mas.loss_window`,
`HardBuffer` and `repeat_updates` in `keras_mas.hard_buffer`; they are
re-exported here.
"""

import json
import os
import shutil
import tempfile
import time
import warnings

import keras
import numpy as np
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
import tensorflow as tf

from keras_mas import _checks
from keras_mas import architectures
from keras_mas import callbacks as callbacks_lib
from keras_mas import export as export_lib
from keras_mas import hard_buffer
from keras_mas import loss_window
from keras_mas import metrics as metrics_lib
from keras_mas import models
from keras_mas import regularizers
from keras_mas import streams as streams_lib
from keras_mas import training

__all__ = ["METHODS", "HardBuffer", "LossWindow", "TaskFreeConsolidation",
           "fit_stream", "format_results", "repeat_updates", "run_stream"]

# What `run_stream` compares, on the same stream and buffer size:
# task-free MAS; online fine-tuning (no buffer, no penalty); experience
# replay (the hard buffer rehearsed, no penalty); MAS consolidating on the
# buffer at the true (oracle) boundaries.
METHODS = ("mas", "finetune", "replay", "mas_oracle")

# Re-exported: the pieces of task-free MAS, in modules of their own.
HardBuffer = hard_buffer.HardBuffer
LossWindow = loss_window.LossWindow
repeat_updates = hard_buffer.repeat_updates
DEFAULT_BUFFER_SIZE = hard_buffer.DEFAULT_BUFFER_SIZE
DEFAULT_PEAK_MIN_RISE = loss_window.DEFAULT_PEAK_MIN_RISE
DEFAULT_PEAK_STDDEVS = loss_window.DEFAULT_PEAK_STDDEVS
DEFAULT_PLATEAU_MEAN_BELOW = loss_window.DEFAULT_PLATEAU_MEAN_BELOW
DEFAULT_PLATEAU_VARIANCE_BELOW = loss_window.DEFAULT_PLATEAU_VARIANCE_BELOW
DEFAULT_WINDOW_SIZE = loss_window.DEFAULT_WINDOW_SIZE

_CONSOLIDATE_AT = ("plateaus",)
# Keys under which a compiled accuracy metric appears in `fit`'s logs.
_ACCURACY_KEYS = ("accuracy", "sparse_categorical_accuracy", "acc",
                  "categorical_accuracy")


def _stream_layout():
  """TensorBoard's Custom Scalars page: the window against the level of
  the next peak in one chart, the events in another."""
  charts = [("loss window: incoming loss, window mean, level of the next "
             "peak", ("incoming_loss", "window_mean", "peak_level")),
            ("peaks, plateaus and consolidations so far",
             ("peaks", "plateaus", "consolidations"))]
  return custom_scalar_summary.pb(layout_pb2.Layout(category=[
      layout_pb2.Category(title="task-free stream", chart=[
          layout_pb2.Chart(title=title, multiline=(
              layout_pb2.MultilineChartContent(
                  tag=[f"^stream/{t}$" for t in tags])))
          for title, tags in charts])]))


_STREAM_LAYOUT = _stream_layout()


class TaskFreeConsolidation(keras.callbacks.Callback):
  """Task-free MAS inside `model.fit`: rehearse, watch, consolidate.

  Pass it to `model.fit` over a stream (a batched `tf.data.Dataset` in
  stream order); at `on_train_begin` it sets its `HardBuffer` as the
  model's `rehearsal`, so that each train step:

  1. joins the buffer to the incoming batch and trains on both;
  2. keeps in the buffer the hardest samples by their losses before the
     step; the metrics count the incoming samples alone, from predictions
     made before the step: `fit`'s accuracy is the prequential
     (test-then-train) accuracy.

  At `on_train_end` the buffer is detached again (its contents stay).
  After each incoming batch (`on_train_batch_end`):

  3. *watch*: the incoming batch's loss (before the step, the buffer's
     left out: it holds the hardest samples by construction and would lift
     the window) goes into the `LossWindow`;
  4. *consolidate*: at a plateau, `model.consolidate(buffer inputs)`: MAS
     importance on the buffer, accumulated into Ω, and θ* ← θ (Ω and θ*
     are variables: the train step is not traced again).

  The model must be a compiled `keras_mas.MASModel` with
  `steps_per_execution=1` (one callback call per batch); its train step
  runs without XLA (`jit_compile` is turned off with a warning: the joined
  batch's size changes while the buffer fills).

  Example:

  ```python
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"])
  learner = keras_mas.task_free.TaskFreeConsolidation(buffer_size=50)
  model.fit(stream_dataset, callbacks=[learner])
  print(learner.consolidations)  # steps at which it consolidated
  ```

  Args:
    buffer_size: samples in the hard buffer (rehearsal and importance).
    window: a `LossWindow` (default: its documented defaults).
    rehearse: train each batch together with the buffer.
    consolidate_at: `"plateaus"` (task-free, the detector decides), None
      (never: fine-tuning or replay), or a list of step numbers (oracle
      boundaries: consolidate after those incoming batches).
    strength: λ set at each consolidation (None keeps the model's).
    accumulate: `"sum"` (the MAS paper's) or `"decay"`, see
      `MASModel.consolidate`.
    loss_fn: per-sample loss `fn(labels, outputs)` on tensors (the
      buffer's ranking and the window); default: sparse categorical
      cross-entropy of logits.
    updates_per_batch: train steps on each incoming batch; above 1, `fit`
      must be given `repeat_updates(stream, updates_per_batch)`
      (`fit_stream` does it).
    log_dir: if given, TensorBoard scalars under `stream/` are written
      there at every incoming batch: the incoming loss, the window's mean
      and variance, the level the window mean must cross for the next
      peak, the numbers of peaks, plateaus and consolidations so far
      (staircases rising at each event) and the online accuracy; histograms
      of Ω at each consolidation; and a Custom Scalars layout showing the
      window against the peak level in one chart.

  Raises:
    ValueError: naming the argument, for a value out of range; at the
      start of `fit`, for a model that cannot run it.
  """

  def __init__(self, buffer_size=DEFAULT_BUFFER_SIZE, window=None,
               rehearse=True, consolidate_at="plateaus", strength=None,
               accumulate="sum", loss_fn=None, updates_per_batch=1,
               log_dir=None):
    super().__init__()
    self.buffer = HardBuffer(_checks.positive_int("buffer_size", buffer_size),
                             loss_fn=loss_fn, rehearse=rehearse,
                             updates_per_batch=updates_per_batch)
    self.window = window if window is not None else LossWindow()
    if not isinstance(self.window, LossWindow):
      raise ValueError(
          "Invalid value for argument `window`. Expected a LossWindow. "
          f"Received: window of type {type(window).__name__}")
    if consolidate_at is None or (isinstance(consolidate_at, str)
                                  and consolidate_at in _CONSOLIDATE_AT):
      self.oracle_steps = None
    else:
      try:
        self.oracle_steps = sorted({int(s) for s in consolidate_at})
      except (TypeError, ValueError):
        self.oracle_steps = [0]
      if not self.oracle_steps or self.oracle_steps[0] < 1:
        raise ValueError(
            "Invalid value for argument `consolidate_at`. Expected "
            "'plateaus', None, or a list of step numbers >= 1. Received: "
            f"consolidate_at={consolidate_at!r}")
    if accumulate not in ("sum", "decay"):
      raise ValueError(
          "Invalid value for argument `accumulate`. Expected 'sum' or "
          f"'decay'. Received: accumulate={accumulate!r}")
    if strength is not None:
      strength = regularizers.validate_strength(strength)
    self.consolidate_at = consolidate_at
    self.strength = strength
    self.accumulate = accumulate
    self.log_dir = log_dir
    self._writer = None
    self.reset()

  @property
  def rehearse(self):
    return self.buffer.rehearse

  @property
  def updates_per_batch(self):
    return self.buffer.updates_per_batch

  def reset(self):
    """A fresh stream: empty buffer and window, no steps, no records."""
    self.buffer.reset()
    self.window.reset()
    self.step = 0
    self.consolidations = []
    self.online_correct = []
    self.incoming_losses = []
    self._seen = self._correct = 0

  @property
  def online_accuracy(self):
    """Prequential accuracy so far: each batch tested before training
    (NaN without an accuracy metric)."""
    seen = sum(n for _, n in self.online_correct)
    if not seen or any(c is None for c, _ in self.online_correct):
      return float("nan")
    return sum(c for c, _ in self.online_correct) / seen

  def on_train_begin(self, logs=None):
    model = self.model
    if not isinstance(model, models.MASModel):
      raise ValueError(
          "Invalid value for argument `model`. Expected a keras_mas.MASModel "
          "(keras_mas.MASModel.from_model(model) makes one). Received: "
          f"{type(model).__name__}")
    every = getattr(model, "steps_per_execution", 1)
    if every != 1:
      raise ValueError(
          "Invalid value for argument `steps_per_execution`. Expected 1 "
          "for task-free learning (the detector reads every incoming "
          "batch). Received: steps_per_execution="
          f"{every}; compile the model with steps_per_execution=1")
    again = False
    if model.jit_compile:
      # As Keras does for `run_eagerly`: XLA cannot compile a batch whose
      # size changes while the buffer fills.
      warnings.warn(
          "Task-free learning cannot run its train step with XLA: the joined "
          "batch grows while the buffer fills. Disabling `jit_compile`.",
          stacklevel=2)
      model.jit_compile = False
      again = True
    if model.rehearsal is not self.buffer:
      model.rehearsal = self.buffer
      again = True
    if again:
      # `fit` made its train function before calling back: make it again.
      model.make_train_function(force=True)
    self._seen = self._correct = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._seen = self._correct = 0  # `fit` resets its metrics.

  def _online_correct(self, logs, count):
    """Correct incoming predictions of the last batch: counted by the
    buffer (class ids), else from the running accuracy in `logs` (None
    without either)."""
    correct = self.buffer.incoming_correct
    key = next((k for k in _ACCURACY_KEYS if k in (logs or {})), None)
    self._seen += count
    if key is not None:
      so_far = int(round(float(logs[key]) * self._seen))
      if correct is None:
        correct = so_far - self._correct
      self._correct = so_far
    return correct

  def on_train_batch_end(self, batch, logs=None):
    if self.updates_per_batch > 1 and self.buffer.phase:
      return  # More steps on this incoming batch to come.
    self.step += 1
    incoming = self.buffer.incoming_loss
    count = self.buffer.incoming_count
    if not np.isfinite(incoming):
      raise ValueError(
          f"Training diverged at stream step {self.step}: the incoming loss "
          f"is {incoming}. Lower the learning rate or the strength λ.")
    self.online_correct.append((self._online_correct(logs, count), count))
    self.incoming_losses.append(incoming)
    event = self.window.update(incoming)
    if self.oracle_steps is not None:
      due = self.step in self.oracle_steps
    else:
      due = self.consolidate_at is not None and event == "plateau"
    if due:
      inputs = self.buffer.inputs
      self.model.consolidate(inputs, strength=self.strength,
                             accumulate=self.accumulate,
                             batch_size=len(inputs))
      self.consolidations.append(self.step)
    if self.log_dir is not None:
      self._log(incoming, event, due)

  def _log(self, incoming, event, consolidated):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)
      with self._writer.as_default():
        tf.summary.experimental.write_raw_pb(
            _STREAM_LAYOUT.SerializeToString(), step=0)
    with self._writer.as_default(step=self.step):
      tf.summary.scalar("stream/incoming_loss", incoming)
      if self.window.full:
        tf.summary.scalar("stream/window_mean", self.window.mean)
        tf.summary.scalar("stream/window_variance", self.window.variance)
      if self.window.peak_level is not None and not self.window.after_peak:
        # The level the window mean must cross for the next peak.
        tf.summary.scalar("stream/peak_level", self.window.peak_level)
      # Counts so far: a staircase whose steps mark the events. (Spikes of
      # 0/1 vanish under TensorBoard's smoothing and outlier clipping.)
      tf.summary.scalar("stream/peaks", len(self.window.peaks) - 1)
      tf.summary.scalar("stream/plateaus", len(self.window.plateaus))
      tf.summary.scalar("stream/consolidations", len(self.consolidations))
      if np.isfinite(self.online_accuracy):
        tf.summary.scalar("stream/online_accuracy", self.online_accuracy)
    if consolidated:
      callbacks_lib.log_importance(self._writer, self.model, step=self.step)

  def on_train_end(self, logs=None):
    # The buffer belongs to this `fit`: a later `fit` without the callback
    # trains on its own batches alone (a later one with it attaches again).
    if self.model.rehearsal is self.buffer:
      self.model.rehearsal = None
    if self._writer is not None:
      self._writer.flush()

  def get_state(self):
    """Everything but the model, for a checkpoint: `{"stream": plain
    values, "buffer": NumPy arrays}` (see `set_state`)."""
    return {
        "stream": {"step": self.step, "window": self.window.get_state(),
                   "consolidations": list(self.consolidations),
                   "online_correct": [list(c) for c in self.online_correct],
                   "incoming_losses": list(self.incoming_losses)},
        "buffer": self.buffer.get_state(),
    }

  def set_state(self, state):
    """Restores what `get_state` returned (the model is restored apart)."""
    stream = state["stream"]
    self.buffer.set_state(state["buffer"])
    self.window.set_state(stream["window"])
    self.step = int(stream["step"])
    self.consolidations = [int(s) for s in stream["consolidations"]]
    self.online_correct = [(None if c is None else int(c), int(n))
                           for c, n in stream["online_correct"]]
    self.incoming_losses = [float(v) for v in stream["incoming_losses"]]


def _as_dataset(stream):
  """A batched `tf.data.Dataset` of `(x, y)` from a dataset or NumPy batches."""
  if isinstance(stream, tf.data.Dataset):
    return stream
  batches = [(np.asarray(b[0]), np.asarray(b[1])) for b in stream]
  if not batches:
    raise ValueError(
        "Invalid value for argument `stream`. Expected at least one batch. "
        "Received: an empty stream")
  x0, y0 = batches[0]
  signature = (tf.TensorSpec((None,) + x0.shape[1:], x0.dtype),
               tf.TensorSpec((None,) + y0.shape[1:], y0.dtype))
  return tf.data.Dataset.from_generator(lambda: iter(batches),
                                        output_signature=signature)


def fit_stream(model, stream, task_free, callbacks=None, steps=None,
               updates_per_batch=None, verbose=0):
  """`model.fit` over a stream, once, with task-free consolidation.

  A thin wrapper: `model.fit(repeat_updates(stream, k), epochs=1,
  callbacks=[task_free, *callbacks])`, k being `task_free`'s
  `updates_per_batch`. Callbacks after `task_free` can read
  `task_free.step` (incoming batches done) and its records; Keras's own
  batch index counts train steps (k per incoming batch).

  Example:

  ```python
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"])
  task_free = keras_mas.task_free.TaskFreeConsolidation(updates_per_batch=3)
  keras_mas.task_free.fit_stream(model, dataset.batch(10), task_free)
  ```

  Args:
    model: a compiled `keras_mas.MASModel` (`steps_per_execution=1`).
    stream: a batched `tf.data.Dataset` of `(x, y)` or an iterable of NumPy
      `(x, y)` batches, in stream order.
    task_free: a `TaskFreeConsolidation` (its state continues: call its
      `reset()` for a new stream).
    callbacks: more Keras callbacks, called after `task_free`.
    steps: stop after this many incoming batches (None: the whole stream).
    updates_per_batch: train steps on each incoming batch; None keeps
      `task_free`'s.
    verbose: `fit`'s verbosity.

  Returns:
    `task_free`, holding the consolidation steps and online accuracy.

  Raises:
    ValueError: for an invalid argument, or a non-finite incoming loss
      (the model diverged; nothing is consolidated after it).
  """
  if not isinstance(task_free, TaskFreeConsolidation):
    raise ValueError(
        "Invalid value for argument `task_free`. Expected a "
        "TaskFreeConsolidation. Received: task_free of type "
        f"{type(task_free).__name__}")
  if steps is not None:
    steps = _checks.positive_int("steps", steps)
  if updates_per_batch is not None:
    updates_per_batch = _checks.positive_int("updates_per_batch",
                                            updates_per_batch)
    buffer = task_free.buffer
    if updates_per_batch != buffer.updates_per_batch:
      buffer.updates_per_batch = updates_per_batch
      if getattr(model, "rehearsal", None) is buffer:
        model.rehearsal = None  # Attached again, traced with the new count.
  dataset = _as_dataset(stream)
  if steps is not None:
    dataset = dataset.take(steps)
  model.fit(repeat_updates(dataset, task_free.updates_per_batch), epochs=1,
            shuffle=False, verbose=verbose,
            callbacks=[task_free] + list(callbacks or []))
  return task_free


def accuracies(model, sequence, trained=None, batch_size=256):
  """Test accuracy on every task of `sequence`, one `predict` in all.

  Domain-incremental: the shared head. Class-incremental: over every class
  of tasks `0..trained` (and, for a later task, up to its own classes), as
  `keras_mas.training` scores a task-aware run.
  """
  tasks = sequence.tasks
  seen = max(t.stop for t in tasks[:trained + 1]) if trained is not None else 0
  logits = model.predict(np.concatenate([t.x_test for t in tasks]),
                         batch_size=batch_size, verbose=0)
  result = []
  for task, part in zip(tasks, np.split(
      logits, np.cumsum([len(t.x_test) for t in tasks])[:-1])):
    stop = max(task.stop, seen) if sequence.scenario == "class" else task.stop
    predicted = task.start + np.argmax(part[:, task.start:stop], axis=-1)
    result.append(float(np.mean(
        predicted == task.y_test + task.label_offset + task.start)))
  return result


class _EachIncomingBatch(keras.callbacks.Callback):
  """Calls `on_step(step)` once per incoming batch, after `task_free`."""

  def __init__(self, task_free):
    super().__init__()
    self.task_free = task_free
    self._last = None

  def on_train_begin(self, logs=None):
    self._last = self.task_free.step  # Resumed: that step is done.

  def on_train_batch_end(self, batch, logs=None):
    step = self.task_free.step
    if step != self._last:
      self._last = step
      self.on_step(step)

  def on_step(self, step):
    raise NotImplementedError


class _BoundaryAccuracy(_EachIncomingBatch):
  """Row `i` of the accuracy matrix after step `boundaries[i]`; logged as a
  task-aware run logs it when `log_dir` is given."""

  def __init__(self, task_free, sequence, boundaries, log_dir=None):
    super().__init__(task_free)
    self.sequence, self.boundaries = sequence, list(boundaries)
    self.matrix = np.full((len(boundaries),) * 2, np.nan)
    self.baseline = None
    self.log_dir = log_dir
    self._writer = None

  def on_step(self, step):
    for i, boundary in enumerate(self.boundaries):
      if boundary == step:
        self.matrix[i] = accuracies(self.model, self.sequence, trained=i)
        if self.log_dir is not None and self.baseline is not None:
          if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
          so_far = metrics_lib.summarize(self.matrix[:i + 1, :i + 1],
                                         self.baseline[:i + 1])
          callbacks_lib.log_accuracy_matrix(self._writer, self.matrix,
                                            so_far, step=i)
          self._writer.flush()


def run_stream(sequence, method="mas", workdir=None, batch_size=10,
               transition_steps=0, buffer_size=DEFAULT_BUFFER_SIZE,
               strength=1.0, learning_rate=1e-3, optimizer="adam",
               model="mlp", hidden_units=128, updates_per_batch=3,
               window=None, seed=0, callbacks=None, checkpoint_every=None,
               resume=False, verbose=0):
  """Learns `sequence` as one stream with hidden boundaries; scores it.

  The tasks' training data become one stream of small batches
  (`keras_mas.streams.from_sequence`), learned by one `model.fit` with a
  `TaskFreeConsolidation` callback; the learner never hears where a task
  ends. The accuracy matrix is still measured at the hidden boundaries,
  so the result compares with a task-aware run: `R[i][j]` = test accuracy
  on task `j` at the end of task `i`'s stretch. Every method runs the same
  `fit`: `mas` (the detector consolidates on the buffer), `mas_oracle`
  (consolidates on the buffer at the true boundaries), `replay` (the
  buffer rehearsed, never consolidated), `finetune` (no rehearsal).

  Example:

  ```python
  sequence = keras_mas.tasks.make_sequence("digits", "split", "domain", 5)
  results = keras_mas.task_free.run_stream(sequence, method="mas")
  print(results["acc"], results["forgetting"], results["consolidations"])
  ```

  Args:
    sequence: a domain- or class-incremental `keras_mas.tasks.TaskSequence`.
    method: one of `METHODS`.
    workdir: if given, `results.json`, TensorBoard logs (`tensorboard/`,
      the stream's scalars under `stream/`) and the final model as a
      SavedModel (`export/`) are written there.
    batch_size: samples per incoming batch.
    transition_steps: blur each change over this many batches.
    buffer_size: samples in the hard buffer (all methods but `finetune`
      train on it).
    strength: λ of the MAS penalty.
    learning_rate: optimizer learning rate.
    optimizer: a Keras optimizer name.
    model: an architecture name (see `architectures.build`).
    hidden_units: hidden width of the `mlp` and `cnn`.
    updates_per_batch: train steps on each incoming batch.
    window: a `LossWindow` (default: the documented defaults).
    seed: seeds the model, the stream's blur and training.
    callbacks: more Keras callbacks for the `fit` (their batch index
      counts train steps, `updates_per_batch` per incoming batch).
    checkpoint_every: with `workdir`, write a checkpoint every this many
      incoming batches into `workdir/checkpoint/` (the model with its
      optimizer, Ω and θ*; the window, the buffer, the accuracy rows and
      the online record), replaced whole each time.
    resume: continue the run whose checkpoint is in `workdir` (same
      arguments); the result equals that of an uninterrupted run.
    verbose: 1 prints the table at the end.

  Returns:
    A dict: `method`, `dataset`, `recipe`, `scenario`, `tasks`,
    `accuracy_matrix`, `baseline`, `acc`, `bwt`, `fwt`, `forgetting`,
    `boundaries` (true steps), `consolidations` (steps), `peaks`,
    `plateaus`, `online_accuracy` (prequential, whole stream),
    `online_accuracy_per_task` (over each task's stretch), `num_steps`,
    `config`, `seconds`.

  Raises:
    ValueError: naming the argument, before any training; for `resume`, if
      the checkpoint is missing, damaged or of other arguments; without
      `resume`, if `workdir` holds a checkpoint.
  """
  if method not in METHODS:
    raise ValueError(
        f"Invalid value for argument `method`. Expected one of {METHODS}. "
        f"Received: method={method!r}")
  training.validate_learning_rate(learning_rate)
  stream = streams_lib.from_sequence(sequence, batch_size=batch_size,
                                     transition_steps=transition_steps,
                                     seed=seed)
  window = window if window is not None else LossWindow()
  consolidate_at = {"mas": "plateaus", "mas_oracle": stream.boundaries[:-1],
                    "finetune": None, "replay": None}[method]
  log_dir = None if workdir is None else os.path.join(workdir, "tensorboard")
  task_free = TaskFreeConsolidation(
      buffer_size=buffer_size, window=window,
      rehearse=method != "finetune", consolidate_at=consolidate_at or None,
      updates_per_batch=updates_per_batch, log_dir=log_dir)
  if (checkpoint_every is not None or resume) and workdir is None:
    raise ValueError(
        "Invalid value for argument `workdir`. Expected a directory for "
        "checkpoint_every or resume. Received: workdir=None")
  if checkpoint_every is not None:
    checkpoint_every = _checks.positive_int("checkpoint_every",
                                           checkpoint_every)
  checkpoint_dir = (None if workdir is None
                    else os.path.join(workdir, _CHECKPOINT))
  if checkpoint_dir is not None and not resume and os.path.isdir(
      checkpoint_dir):
    raise ValueError(
        "Invalid value for argument `workdir`. Expected a directory without "
        "a stream checkpoint, or resume=True to continue it. Received: "
        f"workdir={workdir!r} holding {checkpoint_dir}")
  net = architectures.build(model, sequence.input_shape, sequence.num_outputs,
                            hidden_units=hidden_units, seed=seed)
  try:
    opt = keras.optimizers.get({"class_name": optimizer,
                                "config": {"learning_rate": learning_rate}})
  except (ValueError, TypeError) as e:
    raise ValueError(
        "Invalid value for argument `optimizer`. Expected a Keras optimizer "
        f"name such as 'adam' or 'sgd'. Received: optimizer={optimizer!r}"
    ) from e
  # The accuracy metric is the prequential accuracy (see MASModel.rehearsal);
  # no XLA: the joined batch grows while the buffer fills.
  net.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"], jit_compile=False)
  net.strength = strength
  config = {"method": method, "batch_size": int(batch_size),
            "transition_steps": int(transition_steps),
            "buffer_size": int(buffer_size), "strength": float(strength),
            "learning_rate": float(learning_rate), "optimizer": optimizer,
            "model": model, "hidden_units": int(hidden_units),
            "updates_per_batch": int(updates_per_batch),
            "window": window.get_config(), "seed": int(seed)}
  evaluation = _BoundaryAccuracy(task_free, sequence, stream.boundaries,
                                 log_dir)
  first_step, seconds_before = 0, 0.0
  if resume:
    net, state = _read_checkpoint(checkpoint_dir, config)
    task_free.set_state(state)
    baseline = state["baseline"]
    evaluation.matrix = np.array(
        [[np.nan if v is None else v for v in row] for row in state["matrix"]],
        dtype="float64")
    first_step, seconds_before = task_free.step, state["seconds"]
  else:
    baseline = accuracies(net, sequence)
  evaluation.baseline = baseline
  listed = [evaluation] + list(callbacks or [])
  if checkpoint_every is not None:
    listed.append(_StreamCheckpoint(checkpoint_dir, checkpoint_every, config,
                                    task_free, evaluation, baseline,
                                    stream.num_steps, seconds_before))
  keras.utils.set_random_seed(seed)
  started = time.perf_counter()
  fit_stream(net, stream.as_dataset().skip(first_step), task_free,
             callbacks=listed)
  seconds = seconds_before + time.perf_counter() - started
  matrix = evaluation.matrix
  starts = [0] + stream.boundaries[:-1]
  per_task = []
  for start, stop in zip(starts, stream.boundaries):
    part = task_free.online_correct[start:stop]
    per_task.append(sum(c for c, _ in part) / max(1, sum(n for _, n in part)))
  results = {
      "method": method, "dataset": sequence.dataset,
      "recipe": sequence.recipe, "scenario": sequence.scenario,
      "tasks": [t.name for t in sequence.tasks],
      "accuracy_matrix": matrix.tolist(), "baseline": baseline,
      **metrics_lib.summarize(matrix, baseline),
      "boundaries": list(stream.boundaries),
      "consolidations": list(task_free.consolidations),
      "peaks": list(task_free.window.peaks[1:]),
      "plateaus": list(task_free.window.plateaus),
      "online_accuracy": task_free.online_accuracy,
      "online_accuracy_per_task": per_task,
      "num_steps": stream.num_steps, "config": config, "seconds": seconds,
  }
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    heads = ({"seen": (0, max(t.stop for t in sequence.tasks))}
             if sequence.scenario == "class" else None)
    export_lib.export_serving(net, os.path.join(workdir, "export"),
                              sequence.input_shape, heads=heads)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  if verbose:
    print(format_results([results]))
  return results


_CHECKPOINT = "checkpoint"


class _StreamCheckpoint(_EachIncomingBatch):
  """Every `every` incoming batches: the model and the stream's state."""

  def __init__(self, directory, every, config, task_free, evaluation,
               baseline, num_steps, seconds_before):
    super().__init__(task_free)
    self.directory, self.every, self.config = directory, every, config
    self.evaluation = evaluation
    self.baseline, self.num_steps = baseline, num_steps
    self.started = time.perf_counter() - seconds_before

  def on_step(self, step):
    if step % self.every or step >= self.num_steps:
      return
    state = self.task_free.get_state()
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=parent)
    self.model.save(os.path.join(staging, "model.keras"))
    np.savez(os.path.join(staging, "buffer.npz"),
             **{k: v for k, v in state["buffer"].items() if v is not None})
    with open(os.path.join(staging, "state.json"), "w") as f:
      json.dump({"config": self.config, "stream": state["stream"],
                 "baseline": self.baseline,
                 "matrix": [[None if np.isnan(v) else float(v) for v in row]
                            for row in self.evaluation.matrix],
                 "seconds": time.perf_counter() - self.started}, f)
    # The old checkpoint goes only once the new one is whole.
    old = None
    if os.path.isdir(self.directory):
      old = self.directory + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(self.directory, old)
    os.rename(staging, self.directory)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(directory, config):
  """`(model, state)` of a stream checkpoint, checked against `config`."""
  if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
    directory += ".old"  # Interrupted between the two renames.
  try:
    with open(os.path.join(directory, "state.json")) as f:
      state = json.load(f)
    with np.load(os.path.join(directory, "buffer.npz")) as saved:
      buffer = {k: saved[k] for k in ("inputs", "labels", "losses")
                if k in saved}
    model = keras.models.load_model(os.path.join(directory, "model.keras"),
                                    safe_mode=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `resume`. Expected a readable stream "
        f"checkpoint in {directory}. Received: {type(e).__name__}: {e}"
    ) from e
  if state.get("config") != config:
    stored = state.get("config") or {}
    changed = sorted(k for k in set(config) | set(stored)
                     if stored.get(k) != config.get(k))
    raise ValueError(
        "Invalid value for argument `resume`. The checkpoint was made with "
        "other arguments; differing: "
        + ", ".join(f"{k}={stored.get(k)!r} there, {config.get(k)!r} here"
                    for k in changed))
  state["buffer"] = buffer or {"inputs": None}
  return model, state


def format_results(results):
  """One line per run: ACC, BWT, forgetting, online accuracy, consolidations."""
  lines = [f"{'method':<11} {'ACC':>6} {'BWT':>7} {'forget':>7} "
           f"{'online':>7}  consolidations (true boundaries)"]
  for r in results:
    lines.append(
        f"{r['method']:<11} {r['acc']:6.3f} {r['bwt']:+7.3f} "
        f"{r['forgetting']:7.3f} {r['online_accuracy']:7.3f}  "
        f"{r['consolidations']} ({r['boundaries'][:-1]})")
  return "\n".join(lines)
