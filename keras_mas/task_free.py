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
hold it beside the model.
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

from keras_mas import architectures
from keras_mas import callbacks as callbacks_lib
from keras_mas import export as export_lib
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


def _sparse_crossentropy(labels, outputs):
  return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                      from_logits=True)


def _empty(spec_shape, dtype, name):
  """A variable holding no rows yet, any number later (its batch axis is
  left open: `assign` of a tensor with another row count is allowed)."""
  return tf.Variable(tf.zeros((0,) + tuple(spec_shape), dtype),
                     shape=tf.TensorShape((None,) + tuple(spec_shape)),
                     trainable=False, name=name)


class HardBuffer:
  """The `capacity` hardest recent samples, kept inside the train step.

  Used as `MASModel.rehearsal`: each training batch is the incoming batch
  followed by the buffer's samples (`join`); after the step, the buffer's
  samples and the incoming ones compete on their losses measured just
  before the step (the same weights for all), and the `capacity` highest
  stay (`update`, `tf.math.top_k`). A sample the model has learned leaves;
  one it still gets wrong stays and is rehearsed again. On equal losses
  the incoming (newer) sample wins. All of it runs in the traced train
  step, on `tf.Variable`s made at the first batch (their batch axis is
  open, so the buffer grows while it fills without a retrace).

  With `updates_per_batch = k > 1`, each incoming batch is followed in the
  dataset by `k − 1` *empty* batches (`repeat_updates` makes them): each
  trains once more on the incoming batch, kept from the first, joined to
  the same buffer; the buffer is updated after the k-th step from the
  losses measured before the first. The metrics see the incoming samples
  once, before any step on them: prequential.

  Example:

  ```python
  buffer = keras_mas.task_free.HardBuffer(50)
  model.rehearsal = buffer  # a compiled keras_mas.MASModel
  model.fit(stream_dataset)  # each batch rehearsed with the buffer
  print(len(buffer), buffer.losses)
  ```

  Args:
    capacity: the most samples kept.
    loss_fn: `fn(labels, outputs) -> per-sample losses` on tensors (it
      runs in the train step); default: sparse categorical cross-entropy
      of logits.
    rehearse: join the buffer to each batch. False: the buffer is kept
      (the hardest incoming samples, for importance) but not trained on.
    updates_per_batch: train steps on each incoming batch (see above).

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, capacity=DEFAULT_BUFFER_SIZE, loss_fn=None,
               rehearse=True, updates_per_batch=1):
    self.capacity = _check_positive_int("capacity", capacity)
    self.updates_per_batch = _check_positive_int("updates_per_batch",
                                                 updates_per_batch)
    if loss_fn is not None and not callable(loss_fn):
      raise ValueError(
          "Invalid value for argument `loss_fn`. Expected a function "
          f"(labels, outputs) -> per-sample losses. Received: "
          f"loss_fn={loss_fn!r}")
    self.loss_fn = loss_fn or _sparse_crossentropy
    self.rehearse = bool(rehearse)
    self._inputs = None

  @property
  def built(self):
    return self._inputs is not None

  def build(self, input_shape, label_shape=(), input_dtype="float32",
            label_dtype="int64"):
    """Makes the variables: per-sample shapes, without the batch axis.

    `join` calls it at the first batch; call it before to choose."""
    input_shape = tuple(input_shape)
    label_shape = tuple(label_shape)
    if any(d is None for d in input_shape + label_shape):
      raise ValueError(
          "Invalid value for argument `input_shape`. Expected fully known "
          "per-sample shapes of inputs and labels. Received: input_shape="
          f"{input_shape}, label_shape={label_shape}")
    with tf.init_scope():
      self._inputs = _empty(input_shape, input_dtype, "buffer_inputs")
      self._labels = _empty(label_shape, label_dtype, "buffer_labels")
      self._losses = _empty((), "float32", "buffer_losses")
      # The incoming batch and the joined batch's losses, kept from the
      # first of `updates_per_batch` steps for the others.
      self._kept_inputs = _empty(input_shape, input_dtype, "kept_inputs")
      self._kept_labels = _empty(label_shape, label_dtype, "kept_labels")
      self._kept_losses = _empty((), "float32", "kept_losses")
      self._phase = tf.Variable(0, dtype="int32", trainable=False,
                                name="phase")
      self._incoming_loss = tf.Variable(float("nan"), dtype="float32",
                                        trainable=False, name="incoming_loss")
      self._incoming_count = tf.Variable(0, dtype="int32", trainable=False,
                                         name="incoming_count")
      self._incoming_correct = tf.Variable(-1, dtype="int32",
                                           trainable=False,
                                           name="incoming_correct")

  def __len__(self):
    return int(tf.shape(self._inputs)[0]) if self.built else 0

  @property
  def inputs(self):
    """The samples kept, a NumPy array (None while empty)."""
    return self._inputs.numpy() if len(self) else None

  @property
  def labels(self):
    return self._labels.numpy() if len(self) else None

  @property
  def losses(self):
    """Each sample's loss when last measured (float32)."""
    return self._losses.numpy() if len(self) else None

  @property
  def incoming_loss(self):
    """The last incoming batch's mean loss, before any step on it."""
    return float(self._incoming_loss.numpy()) if self.built else float("nan")

  @property
  def incoming_count(self):
    """The last incoming batch's number of samples."""
    return int(self._incoming_count.numpy()) if self.built else 0

  @property
  def incoming_correct(self):
    """Of the last incoming batch, the samples whose top output was their
    label before any step on them; None unless the labels are class ids
    and the outputs have a class axis."""
    correct = int(self._incoming_correct.numpy()) if self.built else -1
    return None if correct < 0 else correct

  @property
  def phase(self):
    """Steps taken on the current incoming batch, modulo
    `updates_per_batch` (0: the batch is done)."""
    return int(self._phase.numpy()) if self.built else 0

  def _check_batch(self, x, y):
    if not tf.is_tensor(x) and (isinstance(x, (list, tuple, dict))):
      flat = tf.nest.flatten(x)
      if len(flat) != 1:
        raise ValueError(
            "Invalid value for argument `x`. Expected one input tensor per "
            f"batch for a HardBuffer. Received: {len(flat)} inputs")
      x = flat[0]
    if y is None or not tf.is_tensor(y) and isinstance(y, (list, tuple,
                                                          dict)):
      raise ValueError(
          "Invalid value for argument `y`. Expected one label tensor per "
          f"batch (rehearsal trains on labels). Received: y={y!r}")
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    if not self.built:
      self.build(x.shape[1:], y.shape[1:], x.dtype, y.dtype)
    if (x.shape[1:] != self._inputs.shape[1:]
        or y.shape[1:] != self._labels.shape[1:]):
      raise ValueError(
          "Invalid value for argument `x`. Expected samples of the buffer's "
          f"shapes {tuple(self._inputs.shape[1:])} (labels "
          f"{tuple(self._labels.shape[1:])}). Received: "
          f"{tuple(x.shape[1:])} ({tuple(y.shape[1:])})")
    return (tf.cast(x, self._inputs.dtype), tf.cast(y, self._labels.dtype))

  def join(self, x, y, sample_weight=None):
    """The batch to train on: the incoming samples, then the buffer's.

    Called by `MASModel.train_step` (traced). An empty incoming batch,
    with `updates_per_batch > 1`, stands for the batch kept from the
    first step.

    Returns:
      `(x, y, sample_weight)`, the buffer's samples weighted 1.
    """
    x, y = self._check_batch(x, y)
    if self.updates_per_batch > 1:
      if sample_weight is not None:
        raise ValueError(
            "Invalid value for argument `sample_weight`. Expected None with "
            f"updates_per_batch={self.updates_per_batch}. Received: sample "
            "weights (or class_weight)")
      first = tf.equal(self._phase, 0)
      tf.debugging.assert_equal(
          first, tf.shape(x)[0] > 0, message=(
              f"updates_per_batch={self.updates_per_batch}: each incoming "
              "batch must be followed by that many empty batches less one "
              "(keras_mas.task_free.repeat_updates)"))
      x = tf.cond(first, lambda: x, self._kept_inputs.read_value)
      y = tf.cond(first, lambda: y, self._kept_labels.read_value)
      self._kept_inputs.assign(x)
      self._kept_labels.assign(y)
    if not self.rehearse:
      return x, y, sample_weight
    kept = self._inputs.read_value()
    if sample_weight is not None:
      sample_weight = tf.concat([sample_weight, tf.ones(
          tf.concat([tf.shape(kept)[:1], tf.shape(sample_weight)[1:]], 0),
          sample_weight.dtype)], 0)
    return (tf.concat([x, kept], 0),
            tf.concat([y, self._labels.read_value()], 0), sample_weight)

  def update(self, x, y, y_pred, incoming):
    """Keeps the hardest `capacity` samples of the joined batch (and, when
    not rehearsing, of the buffer), by their losses before the step.

    Called by `MASModel.train_step` (traced) after the step: `(x, y)` is
    what `join` returned, `y_pred` its outputs before the step, `incoming`
    the number of incoming samples (0 for a repeated step).
    """
    x, y = self._check_batch(x, y)
    losses = tf.reshape(tf.cast(self.loss_fn(y, y_pred), "float32"), [-1])
    k = self.updates_per_batch
    if k > 1:
      phase = self._phase.read_value()
      losses = tf.cond(tf.equal(phase, 0), lambda: losses,
                       self._kept_losses.read_value)
      self._kept_losses.assign(losses)
      incoming = tf.shape(self._kept_inputs)[0]
      last = tf.equal(phase, k - 1)
      self._phase.assign((phase + 1) % k)
    incoming = tf.cast(incoming, "int32")
    self._incoming_loss.assign(tf.reduce_mean(losses[:incoming]))
    self._incoming_count.assign(incoming)
    if (y.dtype.is_integer and y_pred.shape.rank is not None
        and y_pred.shape.rank == y.shape.rank + 1):
      # Class ids and class scores: count the prequential hits. At a
      # repeated step the kept batch's first-step predictions are gone, so
      # the count is kept.
      hits = tf.reduce_sum(tf.cast(tf.equal(
          tf.argmax(y_pred[:incoming], axis=-1),
          tf.cast(y[:incoming], "int64")), "int32"))
      if k > 1:
        hits = tf.cond(tf.equal(phase, 0), lambda: hits,
                       self._incoming_correct.read_value)
      self._incoming_correct.assign(hits)
    if self.rehearse:
      candidates = (x, y, losses)
    else:
      candidates = (tf.concat([x, self._inputs.read_value()], 0),
                    tf.concat([y, self._labels.read_value()], 0),
                    tf.concat([losses, self._losses.read_value()], 0))

    def keep():
      # top_k puts the lower index first on ties: incoming samples win.
      best = tf.math.top_k(candidates[2], k=tf.minimum(
          self.capacity, tf.shape(candidates[2])[0]))
      return (tf.gather(candidates[0], best.indices),
              tf.gather(candidates[1], best.indices), best.values)

    def unchanged():
      return (self._inputs.read_value(), self._labels.read_value(),
              self._losses.read_value())

    new = keep() if k == 1 else tf.cond(last, keep, unchanged)
    for variable, value in zip((self._inputs, self._labels, self._losses),
                               new):
      variable.assign(value)

  def reset(self):
    """Empties the buffer (a fresh stream)."""
    if self.built:
      self._assign(self._inputs.numpy()[:0], self._labels.numpy()[:0],
                   np.zeros(0, "float32"))

  def _assign(self, inputs, labels, losses):
    self._inputs.assign(inputs)
    self._labels.assign(labels)
    self._losses.assign(losses)
    for kept in (self._kept_inputs, self._kept_labels, self._kept_losses):
      kept.assign(tf.zeros((0,) + tuple(kept.shape[1:]), kept.dtype))
    self._phase.assign(0)
    self._incoming_loss.assign(float("nan"))
    self._incoming_count.assign(0)
    self._incoming_correct.assign(-1)

  def get_state(self):
    """`{"inputs", "labels", "losses"}` as NumPy arrays (None when empty);
    `numpy.savez` writes them.

    Raises:
      ValueError: between the steps of one incoming batch (the state is
        that of whole batches).
    """
    if self.phase:
      raise ValueError(
          "Invalid call to `get_state`. Expected a buffer between incoming "
          f"batches. Received: {self.phase} of {self.updates_per_batch} "
          "steps on the current batch done")
    return {"inputs": self.inputs, "labels": self.labels,
            "losses": self.losses}

  def set_state(self, state):
    """Restores what `get_state` returned (making the variables if needed).

    Raises:
      ValueError: for a state larger than the capacity, of mismatched
        lengths or of other sample shapes (nothing changes).
    """
    if state.get("inputs") is None:
      self.reset()
      return
    x, y = np.asarray(state["inputs"]), np.asarray(state["labels"])
    losses = np.asarray(state["losses"], dtype="float32").reshape(-1)
    if (not len(x) == len(y) == len(losses) or len(x) > self.capacity
        or not np.all(np.isfinite(losses))):
      raise ValueError(
          "Invalid value for argument `state`. Expected at most "
          f"{self.capacity} samples with one label and finite loss each. "
          f"Received: {len(x)} inputs, {len(y)} labels, {len(losses)} losses")
    if self.built and (x.shape[1:] != tuple(self._inputs.shape[1:])
                       or y.shape[1:] != tuple(self._labels.shape[1:])):
      raise ValueError(
          "Invalid value for argument `state`. Expected samples of the "
          f"buffer's shape {tuple(self._inputs.shape[1:])}. Received: "
          f"{x.shape[1:]}")
    if not self.built:
      self.build(x.shape[1:], y.shape[1:], x.dtype, y.dtype)
    self._assign(x.astype(self._inputs.dtype.as_numpy_dtype),
                 y.astype(self._labels.dtype.as_numpy_dtype), losses)


def repeat_updates(dataset, updates_per_batch):
  """Each batch of `dataset` followed by `updates_per_batch − 1` empty ones.

  With a `HardBuffer(updates_per_batch=k)` as `model.rehearsal`, an empty
  batch means one more step on the last incoming batch (see `HardBuffer`):
  `model.fit(repeat_updates(stream, k))` takes k steps per incoming batch
  and its metrics still count each incoming sample once.

  Args:
    dataset: a batched `tf.data.Dataset` of `(x, y)`.
    updates_per_batch: a positive integer; 1 returns `dataset`.

  Returns:
    A `tf.data.Dataset`.
  """
  k = _check_positive_int("updates_per_batch", updates_per_batch)
  if k == 1:
    return dataset

  def expand(*element):
    empty = tf.nest.map_structure(lambda t: t[:0], element)
    return tf.data.Dataset.from_tensors(element).concatenate(
        tf.data.Dataset.from_tensors(empty).repeat(k - 1))

  repeated = dataset.flat_map(expand)
  count = int(dataset.cardinality())
  if count >= 0:
    # Known length: `fit` counts its steps (no "ran out of data" warning).
    repeated = repeated.apply(tf.data.experimental.assert_cardinality(
        count * k))
  return repeated


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
    self.buffer = HardBuffer(_check_positive_int("buffer_size", buffer_size),
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
    steps = _check_positive_int("steps", steps)
  if updates_per_batch is not None:
    updates_per_batch = _check_positive_int("updates_per_batch",
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
