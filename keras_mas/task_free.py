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

`TaskFreeConsolidation` holds the window and the buffer and consolidates;
`fit_stream` learns a stream with it (one pass, test-then-train, the
model's own compiled train step); `run_stream` turns a task sequence into
one stream with hidden boundaries (`keras_mas.streams`) and scores
task-free MAS against online fine-tuning, experience replay and MAS at the
true boundaries. Every piece keeps its state as plain values (`get_state` /
`set_state`) so that a checkpoint can hold it beside the model.
"""

import itertools
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mas import architectures
from keras_mas import callbacks as callbacks_lib
from keras_mas import metrics as metrics_lib
from keras_mas import regularizers
from keras_mas import streams as streams_lib
from keras_mas import training

__all__ = ["METHODS", "HardBuffer", "LossWindow", "TaskFreeConsolidation",
           "fit_stream", "format_results", "run_stream",
           "sparse_crossentropy_per_sample"]

# What `run_stream` compares, on the same stream and buffer size:
# task-free MAS; online fine-tuning (no buffer, no penalty); experience
# replay (the hard buffer rehearsed, no penalty); MAS consolidating on the
# buffer at the true (oracle) boundaries.
METHODS = ("mas", "finetune", "replay", "mas_oracle")

# Defaults, for cross-entropy losses of a classifier learning online from
# batches of ~10 samples (they work on the bundled digits streams).
# Losses kept in the sliding window: enough to smooth one noisy small batch,
# few enough to react within a task's first dozen batches.
DEFAULT_WINDOW_SIZE = 5
# A plateau's window mean must be below this (cross-entropy 0.2: ~82 % of
# the probability on the right class): the stretch has been learned.
DEFAULT_PLATEAU_MEAN_BELOW = 0.2
# ... and its variance below this: the loss has settled, not just dipped.
DEFAULT_PLATEAU_VARIANCE_BELOW = 0.02
# A peak: the window mean exceeds the last plateau's mean by this many of
# the plateau's standard deviations (the paper's rule, with 1) ...
DEFAULT_PEAK_STDDEVS = 1.0
# ... and by at least this much: a plateau with a tiny variance would
# otherwise call every noisy batch a peak.
DEFAULT_PEAK_MIN_RISE = 0.15
# Samples kept for rehearsal and importance.
DEFAULT_BUFFER_SIZE = 50


def _check_positive_int(name, value):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a positive integer. "
        f"Received: {name}={value!r}")
  return int(value)


def _check_non_negative(name, value):
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not np.isfinite(number) or number < 0:
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a finite number >= 0. "
        f"Received: {name}={value!r}")
  return number


class LossWindow:
  """Detects peaks and plateaus in a stream of losses (the paper's trigger).

  Keep the last `window_size` losses. Once the window is full:

  * a **peak** is a window mean above `plateau mean + max(peak_stddevs ·
    plateau std, peak_min_rise)` of the last plateau: the loss rose, the
    data changed. The start of the stream counts as a peak.
  * a **plateau** is, after a peak, a window whose mean is below
    `plateau_mean_below` and whose variance is below
    `plateau_variance_below`: the new data has been learned. The window's
    mean and variance become the reference for the next peak (and follow
    the window down while its mean keeps falling: a loss still settling
    when the plateau is declared would otherwise hide the next rise);
    there is no other plateau until the next peak.

  `update` returns `"peak"`, `"plateau"` or None; the caller consolidates on
  `"plateau"`. Plain Python and NumPy: no TensorFlow.

  Example:

  ```python
  window = LossWindow()
  for step, loss in enumerate(losses):
    if window.update(loss) == "plateau":
      model.consolidate(buffer.inputs)
  ```

  Args:
    window_size: number of recent losses in the window.
    plateau_mean_below: a plateau's window mean is below this.
    plateau_variance_below: a plateau's window variance is below this.
    peak_stddevs: a peak rises this many plateau standard deviations above
      the last plateau's mean ...
    peak_min_rise: ... and at least this much above it.

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, window_size=DEFAULT_WINDOW_SIZE,
               plateau_mean_below=DEFAULT_PLATEAU_MEAN_BELOW,
               plateau_variance_below=DEFAULT_PLATEAU_VARIANCE_BELOW,
               peak_stddevs=DEFAULT_PEAK_STDDEVS,
               peak_min_rise=DEFAULT_PEAK_MIN_RISE):
    self.window_size = _check_positive_int("window_size", window_size)
    self.plateau_mean_below = _check_non_negative("plateau_mean_below",
                                                  plateau_mean_below)
    self.plateau_variance_below = _check_non_negative(
        "plateau_variance_below", plateau_variance_below)
    self.peak_stddevs = _check_non_negative("peak_stddevs", peak_stddevs)
    self.peak_min_rise = _check_non_negative("peak_min_rise", peak_min_rise)
    self.reset()

  def reset(self):
    """Forgets every loss seen: a fresh stream."""
    self.losses = []
    self.step = 0
    # The stream's start is a rise: the first plateau consolidates.
    self.after_peak = True
    self.plateau_mean = None
    self.plateau_variance = None
    self.peaks = [0]
    self.plateaus = []

  @property
  def full(self):
    return len(self.losses) == self.window_size

  @property
  def mean(self):
    """The window's mean loss (NaN while empty)."""
    return float(np.mean(self.losses)) if self.losses else float("nan")

  @property
  def variance(self):
    """The window's variance of the loss (NaN while empty)."""
    return float(np.var(self.losses)) if self.losses else float("nan")

  @property
  def peak_level(self):
    """The window mean above which a peak is declared (None before the
    first plateau, when the stream's start is the peak)."""
    if self.plateau_mean is None:
      return None
    rise = max(self.peak_stddevs * float(np.sqrt(self.plateau_variance)),
               self.peak_min_rise)
    return self.plateau_mean + rise

  def update(self, loss):
    """Adds one loss (the next step's); returns `"peak"`, `"plateau"` or None.

    Args:
      loss: a finite number, e.g. the mean loss of the incoming batch.

    Raises:
      ValueError: if `loss` is not a finite number (nothing changes).
    """
    try:
      value = float(loss)
    except (TypeError, ValueError):
      value = float("nan")
    if not np.isfinite(value):
      raise ValueError(
          "Invalid value for argument `loss`. Expected a finite number. "
          f"Received: loss={loss!r}")
    self.step += 1
    self.losses.append(value)
    del self.losses[:-self.window_size]
    if not self.full:
      return None
    mean, variance = self.mean, self.variance
    if not self.after_peak:
      if mean > self.peak_level:
        self.after_peak = True
        self.peaks.append(self.step)
        return "peak"
      if mean < self.plateau_mean:
        # Still settling: the plateau's level follows the window down.
        self.plateau_mean, self.plateau_variance = mean, variance
      return None
    if (mean < self.plateau_mean_below
        and variance < self.plateau_variance_below):
      self.after_peak = False
      self.plateau_mean, self.plateau_variance = mean, variance
      self.plateaus.append(self.step)
      return "plateau"
    return None

  def get_config(self):
    return {"window_size": self.window_size,
            "plateau_mean_below": self.plateau_mean_below,
            "plateau_variance_below": self.plateau_variance_below,
            "peak_stddevs": self.peak_stddevs,
            "peak_min_rise": self.peak_min_rise}

  def get_state(self):
    """The detector's state as plain (JSON-serialisable) values."""
    return {"losses": list(self.losses), "step": self.step,
            "after_peak": self.after_peak,
            "plateau_mean": self.plateau_mean,
            "plateau_variance": self.plateau_variance,
            "peaks": list(self.peaks), "plateaus": list(self.plateaus)}

  def set_state(self, state):
    """Restores what `get_state` returned.

    Raises:
      ValueError: if `state` lacks a key or holds more losses than the
        window (nothing changes).
    """
    keys = ("losses", "step", "after_peak", "plateau_mean",
            "plateau_variance", "peaks", "plateaus")
    missing = [k for k in keys if k not in state]
    if missing or len(state["losses"]) > self.window_size:
      raise ValueError(
          "Invalid value for argument `state`. Expected the dict of "
          f"LossWindow.get_state() for a window of {self.window_size}. "
          f"Received: missing {missing}, "
          f"{len(state.get('losses', []))} losses")
    self.losses = [float(v) for v in state["losses"]]
    self.step = int(state["step"])
    self.after_peak = bool(state["after_peak"])
    self.plateau_mean = (None if state["plateau_mean"] is None
                         else float(state["plateau_mean"]))
    self.plateau_variance = (None if state["plateau_variance"] is None
                             else float(state["plateau_variance"]))
    self.peaks = [int(s) for s in state["peaks"]]
    self.plateaus = [int(s) for s in state["plateaus"]]


class HardBuffer:
  """The `capacity` hardest recent samples: the highest losses seen last.

  After every step the buffer's samples and the incoming batch compete on
  their current losses (measured on the same weights, just before training
  on them); the `capacity` highest stay. A sample the model has learned
  leaves; one it still gets wrong stays and is rehearsed again. On equal
  losses the newer sample wins.

  Example:

  ```python
  buffer = HardBuffer(50)
  x_all, y_all = buffer.with_batch(x, y)
  losses = per_sample_loss(y_all, model.predict_on_batch(x_all))
  buffer.update(x_all, y_all, losses)
  ```

  Args:
    capacity: the most samples kept.

  Raises:
    ValueError: if `capacity` is not a positive integer.
  """

  def __init__(self, capacity=DEFAULT_BUFFER_SIZE):
    self.capacity = _check_positive_int("capacity", capacity)
    self.inputs = None
    self.labels = None
    self.losses = None

  def __len__(self):
    return 0 if self.inputs is None else len(self.inputs)

  def with_batch(self, x, y):
    """The incoming batch followed by the buffer's samples, `(x, y)`."""
    x, y = np.asarray(x), np.asarray(y)
    if not len(self):
      return x, y
    if x.shape[1:] != self.inputs.shape[1:]:
      raise ValueError(
          "Invalid value for argument `x`. Expected inputs of the buffer's "
          f"shape {self.inputs.shape[1:]}. Received: {x.shape[1:]}")
    return (np.concatenate([x, self.inputs.astype(x.dtype, copy=False)]),
            np.concatenate([y, self.labels.astype(y.dtype, copy=False)]))

  def update(self, x, y, losses):
    """Keeps the `capacity` samples of `(x, y)` with the highest `losses`.

    `(x, y)` is what `with_batch` returned (the batch first, so that it
    wins ties), `losses` one value per sample.

    Raises:
      ValueError: for lengths that differ or non-finite losses (nothing
        changes).
    """
    x, y = np.asarray(x), np.asarray(y)
    losses = np.asarray(losses, dtype="float64").reshape(-1)
    if not len(x) == len(y) == len(losses):
      raise ValueError(
          "Invalid value for argument `losses`. Expected one per sample of "
          f"`x` and `y`. Received: {len(x)} inputs, {len(y)} labels, "
          f"{len(losses)} losses")
    if not np.all(np.isfinite(losses)):
      raise ValueError(
          "Invalid value for argument `losses`. Expected finite losses. "
          f"Received: {int(np.sum(~np.isfinite(losses)))} NaN or infinite")
    keep = np.argsort(-losses, kind="stable")[:self.capacity]
    self.inputs, self.labels, self.losses = x[keep], y[keep], losses[keep]

  def get_state(self):
    """`{"inputs", "labels", "losses"}` as NumPy arrays (None when empty);
    `numpy.savez` writes them."""
    return {"inputs": self.inputs, "labels": self.labels,
            "losses": self.losses}

  def set_state(self, state):
    """Restores what `get_state` returned.

    Raises:
      ValueError: for a state larger than the capacity or of mismatched
        lengths (nothing changes).
    """
    if state.get("inputs") is None:
      self.inputs = self.labels = self.losses = None
      return
    x, y = np.asarray(state["inputs"]), np.asarray(state["labels"])
    losses = np.asarray(state["losses"], dtype="float64")
    if not len(x) == len(y) == len(losses) or len(x) > self.capacity:
      raise ValueError(
          "Invalid value for argument `state`. Expected at most "
          f"{self.capacity} samples with one label and loss each. Received: "
          f"{len(x)} inputs, {len(y)} labels, {len(losses)} losses")
    self.inputs, self.labels, self.losses = x, y, losses


def sparse_crossentropy_per_sample(labels, logits):
  """Per-sample sparse categorical cross-entropy of logits, in NumPy (float64).

  Args:
    labels: integer labels, shape `(N,)`.
    logits: shape `(N, C)`.

  Returns:
    The `N` losses.
  """
  logits = np.asarray(logits, dtype="float64")
  labels = np.asarray(labels).reshape(-1).astype("int64")
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_norm = np.log(np.exp(shifted).sum(axis=-1))
  return log_norm - shifted[np.arange(len(labels)), labels]


_CONSOLIDATE_AT = ("plateaus",)


class TaskFreeConsolidation(keras.callbacks.Callback):
  """Task-free MAS on a stream of batches: rehearse, watch, consolidate.

  For each incoming batch (see `fit_stream`, which drives it):

  1. *test*: one inference pass over the batch and the buffer gives each
     sample's loss and the batch's prequential (test-then-train) accuracy;
  2. *train*: the model trains on the batch joined with the buffer
     (rehearsal), through its own compiled train step, MAS penalty included;
  3. *watch*: the batch's loss (measured before training on it) enters the
     `LossWindow`; the batch and the buffer compete for the `HardBuffer` on
     the losses of step 1;
  4. *consolidate*: at a plateau, `model.consolidate(buffer inputs)`: MAS
     importance on the buffer, accumulated into Ω, and θ* ← θ.

  The window sees the incoming batch's loss alone: the buffer holds the
  hardest samples by construction, and its loss would lift the window and
  delay every plateau.

  Example:

  ```python
  task_free = keras_mas.task_free.TaskFreeConsolidation(buffer_size=50)
  keras_mas.task_free.fit_stream(model, stream_dataset, task_free,
                                 callbacks=[tensorboard])
  print(task_free.consolidations)  # steps at which it consolidated
  ```

  Args:
    buffer_size: samples in the hard buffer (rehearsal and importance).
    window: a `LossWindow` (default: its documented defaults).
    rehearse: train each batch together with the buffer.
    consolidate_at: `"plateaus"` (task-free, the detector decides), None
      (never: fine-tuning or replay), or a list of step numbers (oracle
      boundaries: consolidate after those steps).
    strength: λ set at each consolidation (None keeps the model's).
    accumulate: `"sum"` (the MAS paper's) or `"decay"`, see
      `MASModel.consolidate`.
    per_sample_loss: `fn(labels, outputs) -> losses` on NumPy arrays; the
      default is sparse categorical cross-entropy of logits.
    log_dir: if given, TensorBoard scalars under `stream/` are written
      there at every step: the incoming loss, the window's mean and
      variance, peaks, plateaus (1 where detected, else 0), consolidations
      and the online accuracy; and histograms of Ω at each consolidation.

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, buffer_size=DEFAULT_BUFFER_SIZE, window=None,
               rehearse=True, consolidate_at="plateaus", strength=None,
               accumulate="sum", per_sample_loss=None, log_dir=None):
    super().__init__()
    self.buffer = HardBuffer(_check_positive_int("buffer_size", buffer_size))
    self.window = window if window is not None else LossWindow()
    if not isinstance(self.window, LossWindow):
      raise ValueError(
          "Invalid value for argument `window`. Expected a LossWindow. "
          f"Received: window of type {type(window).__name__}")
    if consolidate_at is None or consolidate_at in _CONSOLIDATE_AT:
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
    self.rehearse = bool(rehearse)
    self.strength = strength
    self.accumulate = accumulate
    self.per_sample_loss = per_sample_loss or sparse_crossentropy_per_sample
    self.log_dir = log_dir
    self._writer = None
    self._pending = None
    self.reset()

  def reset(self):
    """A fresh stream: empty buffer and window, no steps, no records."""
    self.buffer = HardBuffer(self.buffer.capacity)
    self.window.reset()
    self.step = 0
    self.consolidations = []
    self.online_correct = []
    self.incoming_losses = []

  @property
  def online_accuracy(self):
    """Prequential accuracy so far: each batch tested before training."""
    seen = sum(n for _, n in self.online_correct)
    return (sum(c for c, _ in self.online_correct) / seen if seen
            else float("nan"))

  def training_batch(self, x, y):
    """Tests the model on an incoming batch; returns what to train on.

    Args:
      x: the incoming inputs (NumPy).
      y: their labels.

    Returns:
      `(x, y)`: the batch followed by the buffer (with `rehearse`), or the
      batch alone.
    """
    x, y = np.asarray(x), np.asarray(y)
    x_all, y_all = self.buffer.with_batch(x, y) if self.rehearse else (x, y)
    # Padded to the full buffer's size: one traced predict function while
    # the buffer fills, not one per size (inference: rows do not mix).
    pad = self.buffer.capacity + len(x) - len(x_all) if self.rehearse else 0
    padded = (np.concatenate([x_all, np.zeros((pad,) + x_all.shape[1:],
                                              x_all.dtype)])
              if pad > 0 else x_all)
    outputs = np.asarray(self.model.predict_on_batch(padded))[:len(x_all)]
    losses = self.per_sample_loss(y_all, outputs)
    n = len(x)
    correct = int(np.sum(np.argmax(outputs[:n], axis=-1) == y.reshape(-1)))
    self._pending = (x_all, y_all, losses, n, correct)
    return x_all, y_all

  def on_train_batch_end(self, batch, logs=None):
    if self._pending is None:
      return  # Not driven by `fit_stream`: nothing was tested.
    x_all, y_all, losses, n, correct = self._pending
    self._pending = None
    self.step += 1
    incoming = float(np.mean(losses[:n]))
    self.online_correct.append((correct, n))
    self.incoming_losses.append(incoming)
    if self.rehearse:
      self.buffer.update(x_all, y_all, losses)
    else:
      self.buffer.update(x_all[:n], y_all[:n], losses[:n])
    event = self.window.update(incoming)
    if self.oracle_steps is not None:
      due = self.step in self.oracle_steps
    else:
      due = self.consolidate_at is not None and event == "plateau"
    if due:
      self.model.consolidate(self.buffer.inputs, strength=self.strength,
                             accumulate=self.accumulate,
                             batch_size=len(self.buffer))
      self.consolidations.append(self.step)
    if self.log_dir is not None:
      self._log(incoming, event, due)

  def _log(self, incoming, event, consolidated):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)
    with self._writer.as_default(step=self.step):
      tf.summary.scalar("stream/incoming_loss", incoming)
      if self.window.full:
        tf.summary.scalar("stream/window_mean", self.window.mean)
        tf.summary.scalar("stream/window_variance", self.window.variance)
      tf.summary.scalar("stream/peak", float(event == "peak"))
      tf.summary.scalar("stream/plateau", float(event == "plateau"))
      tf.summary.scalar("stream/consolidation", float(consolidated))
      tf.summary.scalar("stream/online_accuracy", self.online_accuracy)
    if consolidated:
      callbacks_lib.log_importance(self._writer, self.model, step=self.step)

  def on_train_end(self, logs=None):
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
    self.window.set_state(stream["window"])
    self.buffer.set_state(state["buffer"])
    self.step = int(stream["step"])
    self.consolidations = [int(s) for s in stream["consolidations"]]
    self.online_correct = [(int(c), int(n))
                           for c, n in stream["online_correct"]]
    self.incoming_losses = [float(v) for v in stream["incoming_losses"]]


def _batches(stream):
  """NumPy `(x, y)` batches of a `tf.data.Dataset` or an iterable."""
  if isinstance(stream, tf.data.Dataset):
    stream = stream.as_numpy_iterator()
  for element in stream:
    x, y = element[0], element[1]
    yield np.asarray(x), np.asarray(y)


def fit_stream(model, stream, task_free, callbacks=None,
               updates_per_batch=1, steps=None, initial_step=0):
  """Learns a stream online, one pass, with task-free consolidation.

  Why a loop and not `model.fit`: rehearsal trains each batch together with
  the buffer chosen by the losses of the *current* weights, so the buffer
  must be joined to the batch between two train steps. Keras 3's `fit`
  reads its input ahead (tf.data prefetching), and its callbacks see
  neither the batch nor per-sample losses; joining inside the train step
  would replace `MASModel.train_step`. This loop calls the model's own
  compiled train step (`train_on_batch`: optimizer, MAS penalty and metrics
  as in `fit`) and drives Keras callbacks (`on_train_begin`,
  `on_train_batch_begin`/`end`, `on_train_end`) so that TensorBoard and
  the user's callbacks work as in `fit`.

  Example:

  ```python
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  task_free = keras_mas.task_free.TaskFreeConsolidation()
  keras_mas.task_free.fit_stream(model, dataset.batch(10), task_free)
  ```

  Args:
    model: a compiled `keras_mas.MASModel` (a plain `keras.Model` works
      when `task_free` never consolidates).
    stream: a batched `tf.data.Dataset` of `(x, y)` or an iterable of NumPy
      `(x, y)` batches, in stream order.
    task_free: a `TaskFreeConsolidation` (its state continues: call its
      `reset()` for a new stream).
    callbacks: more Keras callbacks, called after `task_free` each step.
    updates_per_batch: train steps on each incoming batch (and buffer).
    steps: stop after this many incoming batches (None: the whole stream).
    initial_step: batches of the stream already learned (when resuming,
      `stream` starts after them): callbacks see batch indices from here.

  Returns:
    `task_free`, holding the consolidation steps and online accuracy.

  Raises:
    ValueError: for an invalid argument, or a non-finite training loss
      (the model diverged; nothing is consolidated after it).
  """
  if not isinstance(task_free, TaskFreeConsolidation):
    raise ValueError(
        "Invalid value for argument `task_free`. Expected a "
        "TaskFreeConsolidation. Received: task_free of type "
        f"{type(task_free).__name__}")
  updates_per_batch = _check_positive_int("updates_per_batch",
                                          updates_per_batch)
  if steps is not None:
    steps = _check_positive_int("steps", steps)
  if (isinstance(initial_step, bool)
      or not isinstance(initial_step, (int, np.integer)) or initial_step < 0):
    raise ValueError(
        "Invalid value for argument `initial_step`. Expected an integer >= "
        f"0. Received: initial_step={initial_step!r}")
  listed = [task_free] + list(callbacks or [])
  callback_list = keras.callbacks.CallbackList(listed, model=model)
  callback_list.on_train_begin()
  logs = {}
  for index, (x, y) in enumerate(_batches(stream)):
    if steps is not None and index >= steps:
      break
    index += initial_step
    callback_list.on_train_batch_begin(index)
    x_all, y_all = task_free.training_batch(x, y)
    for _ in range(updates_per_batch):
      logs = model.train_on_batch(x_all, y_all, return_dict=True)
    loss = float(logs.get("loss", 0.0))
    if not np.isfinite(loss):
      raise ValueError(
          f"Training diverged at stream step {index + 1}: the loss is "
          f"{loss}. Lower the learning rate or the strength λ.")
    callback_list.on_train_batch_end(index, logs)
  callback_list.on_train_end(logs)
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


class _BoundaryAccuracy(keras.callbacks.Callback):
  """Row `i` of the accuracy matrix after step `boundaries[i]`; logged as a
  task-aware run logs it when `log_dir` is given."""

  def __init__(self, sequence, boundaries, log_dir=None):
    super().__init__()
    self.sequence, self.boundaries = sequence, list(boundaries)
    self.matrix = np.full((len(boundaries),) * 2, np.nan)
    self.baseline = None
    self.log_dir = log_dir
    self._writer = None

  def on_train_batch_end(self, batch, logs=None):
    step = batch + 1
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
  (`keras_mas.streams.from_sequence`); the learner never hears where a
  task ends. The accuracy matrix is still measured at the hidden
  boundaries, so the result compares with a task-aware run:
  `R[i][j]` = test accuracy on task `j` at the end of task `i`'s stretch.

  Example:

  ```python
  sequence = keras_mas.tasks.make_sequence("digits", "split", "domain", 5)
  results = keras_mas.task_free.run_stream(sequence, method="mas")
  print(results["acc"], results["forgetting"], results["consolidations"])
  ```

  Args:
    sequence: a domain- or class-incremental `keras_mas.tasks.TaskSequence`.
    method: one of `METHODS`.
    workdir: if given, `results.json` and TensorBoard logs (`tensorboard/`,
      the stream's scalars under `stream/`) are written there.
    batch_size: samples per incoming batch.
    transition_steps: blur each change over this many batches.
    buffer_size: samples in the hard buffer (all methods but `finetune`).
    strength: λ of the MAS penalty.
    learning_rate: optimizer learning rate.
    optimizer: a Keras optimizer name.
    model: an architecture name (see `architectures.build`).
    hidden_units: hidden width of the `mlp` and `cnn`.
    updates_per_batch: train steps on each incoming batch.
    window: a `LossWindow` (default: the documented defaults).
    seed: seeds the model, the stream's blur and training.
    callbacks: more Keras callbacks, called at every incoming batch.
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
      rehearse=method != "finetune",
      consolidate_at=consolidate_at or None, log_dir=log_dir)
  if (checkpoint_every is not None or resume) and workdir is None:
    raise ValueError(
        "Invalid value for argument `workdir`. Expected a directory for "
        "checkpoint_every or resume. Received: workdir=None")
  if checkpoint_every is not None:
    checkpoint_every = _check_positive_int("checkpoint_every",
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
  net.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  net.strength = strength
  config = {"method": method, "batch_size": int(batch_size),
            "transition_steps": int(transition_steps),
            "buffer_size": int(buffer_size), "strength": float(strength),
            "learning_rate": float(learning_rate), "optimizer": optimizer,
            "model": model, "hidden_units": int(hidden_units),
            "updates_per_batch": int(updates_per_batch),
            "window": window.get_config(), "seed": int(seed)}
  evaluation = _BoundaryAccuracy(sequence, stream.boundaries, log_dir)
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
  fit_stream(net, itertools.islice(stream.batches(), first_step, None),
             task_free, callbacks=listed,
             updates_per_batch=updates_per_batch, initial_step=first_step)
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
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  if verbose:
    print(format_results([results]))
  return results


_CHECKPOINT = "checkpoint"


class _StreamCheckpoint(keras.callbacks.Callback):
  """Every `every` batches: the model and the stream's state, whole."""

  def __init__(self, directory, every, config, task_free, evaluation,
               baseline, num_steps, seconds_before):
    super().__init__()
    self.directory, self.every, self.config = directory, every, config
    self.task_free, self.evaluation = task_free, evaluation
    self.baseline, self.num_steps = baseline, num_steps
    self.started = time.perf_counter() - seconds_before

  def on_train_batch_end(self, batch, logs=None):
    step = batch + 1
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
