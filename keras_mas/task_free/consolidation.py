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
keeps the window and consolidates; `fit_stream` is `model.fit` with it.
Every piece keeps its state as plain values (`get_state` / `set_state`) so
that a checkpoint can hold it beside the model. The experiment that scores
a stream against its baselines is `keras_mas.experiments.streaming`.
"""

import warnings

import keras
import numpy as np
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
import tensorflow as tf

from keras_mas.core import callbacks as callbacks_lib
from keras_mas.core import models
from keras_mas.core import regularizers
from keras_mas.task_free import _checks
from keras_mas.task_free import hard_buffer
from keras_mas.task_free import loss_window

__all__ = ["DEFAULT_BUFFER_SIZE", "TaskFreeConsolidation", "fit_stream"]

HardBuffer = hard_buffer.HardBuffer
LossWindow = loss_window.LossWindow
repeat_updates = hard_buffer.repeat_updates
DEFAULT_BUFFER_SIZE = hard_buffer.DEFAULT_BUFFER_SIZE

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


