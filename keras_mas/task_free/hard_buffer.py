"""HardBuffer: the hardest recent samples of a stream, inside the train step.

Task-free MAS rehearses each incoming batch with a small buffer of the
samples the model found hardest (highest loss) and measures importance on
it at each plateau. The buffer is a `MASModel.rehearsal`: joined to each
batch and updated in the traced train step, on `tf.Variable`s (on PyTorch
the same TensorFlow ops run eagerly in its step, on host copies of the
batch; JAX refuses a buffer).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_mas.task_free import _checks

__all__ = ["DEFAULT_BUFFER_SIZE", "HardBuffer", "repeat_updates"]

# Samples kept for rehearsal and importance.
DEFAULT_BUFFER_SIZE = 50


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
  step (on PyTorch: eagerly, on host copies of the batch), on
  `tf.Variable`s made at the first batch (their batch axis is open, so the
  buffer grows while it fills without a retrace).

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
      runs in the train step; on PyTorch on the CPU); default: sparse
      categorical cross-entropy of logits.
    rehearse: join the buffer to each batch. False: the buffer is kept
      (the hardest incoming samples, for importance) but not trained on.
    updates_per_batch: train steps on each incoming batch (see above).

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, capacity=DEFAULT_BUFFER_SIZE, loss_fn=None,
               rehearse=True, updates_per_batch=1):
    self.capacity = _checks.positive_int("capacity", capacity)
    self.updates_per_batch = _checks.positive_int("updates_per_batch",
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
  k = _checks.positive_int("updates_per_batch", updates_per_batch)
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
