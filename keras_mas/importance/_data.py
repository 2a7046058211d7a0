"""Turns the `data` argument of the importance estimators into input batches."""

import keras
import numpy as np
import tensorflow as tf


def _is_array_like(value):
  return isinstance(value, (np.ndarray, tf.Tensor, list, tuple, dict)) or (
      hasattr(value, "__array__") and not isinstance(value, tf.data.Dataset)
  )


def _check_arguments(batch_size, num_samples):
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(
        "Invalid value for argument `batch_size`. Expected a positive "
        f"integer. Received: batch_size={batch_size!r}"
    )
  if num_samples is not None and (
      not isinstance(num_samples, (int, np.integer)) or num_samples < 1
  ):
    raise ValueError(
        "Invalid value for argument `num_samples`. Expected a positive "
        f"integer or None. Received: num_samples={num_samples!r}"
    )


def _parts(element, labels):
  x, y, _ = keras.utils.unpack_x_y_sample_weight(element)
  if not labels:
    return (x,)
  if y is None:
    raise ValueError(
        "Invalid value for argument `data`. Expected labels, as `(x, y)` "
        "arrays or a dataset of `(x, y)` batches, for an estimator that "
        "uses them. Received: inputs only")
  return (x, y)


def as_dataset(data, batch_size=32, num_samples=None, labels=False):
  """`data` as batches of `(x,)` or `(x, y)`, with an `element_spec`.

  A `tf.data.Dataset` for a dataset; for arrays, an iterable of tensor
  batches with the `element_spec` a dataset would have.

  The same contract as `input_batches`, for a loop compiled whole: arrays
  are batched, datasets keep their batches (cut to `num_samples`).
  `check_count` then checks the number of samples the loop saw.

  Raises:
    ValueError: if an argument is invalid.
  """
  _check_arguments(batch_size, num_samples)
  if isinstance(data, tf.data.Dataset):
    dataset = data.map(lambda *e: _parts(e if len(e) > 1 else e[0], labels))
    if num_samples is not None:
      dataset = dataset.unbatch().take(num_samples).batch(batch_size)
    return dataset
  if data is not None and _is_array_like(data):
    data = _parts(data, labels) if isinstance(data, tuple) else _parts(
        (data,), labels)
    if num_samples is not None:
      data = tf.nest.map_structure(lambda t: t[:num_samples], data)
    return _ArrayBatches(data, batch_size)
  raise ValueError(
      "Invalid value for argument `data`. Expected a batched "
      "`tf.data.Dataset` or an array of inputs. Received: "
      f"data of type {type(data).__name__}"
  )


class _ArrayBatches:
  """Consecutive batches of arrays as tensors, with a dataset's
  `element_spec`: a `tf.data` pipeline over arrays in memory first copies
  them whole and then costs about as much per batch as an MLP's importance
  step; slicing costs a copy of each batch only."""

  def __init__(self, data, batch_size):
    self._data = tf.nest.map_structure(np.asarray, data)
    self._batch_size = int(batch_size)
    self.element_spec = tf.nest.map_structure(
        lambda a: tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype)),
        self._data)

  def __iter__(self):
    size = len(tf.nest.flatten(self._data)[0])
    for start in range(0, size, self._batch_size):
      yield tf.nest.map_structure(
          lambda a, s=start: tf.constant(a[s:s + self._batch_size]),
          self._data)


def check_count(seen, num_samples):
  """Raises if `data` held no sample, or fewer than `num_samples`."""
  if seen == 0:
    raise ValueError(
        "Invalid value for argument `data`. Expected at least one sample. "
        "Received: an empty dataset"
    )
  if num_samples is not None and seen < num_samples:
    raise ValueError(
        f"Invalid value for argument `num_samples`. Expected at most the "
        f"{seen} samples that `data` holds. Received: "
        f"num_samples={num_samples}"
    )


def input_batches(data, batch_size=32, num_samples=None, labels=False):
  """Yields `(x,)` batches of `data`, or `(x, y)` with `labels=True`.

  Sample weights are always dropped, and labels unless asked for.

  Args:
    data: a batched `tf.data.Dataset` whose elements are `x`, `(x,)`,
      `(x, y)` or `(x, y, sample_weight)`; or the inputs themselves as an
      array, tensor, or a list/dict of them for multi-input models.
    batch_size: batch size used when `data` holds arrays.
    num_samples: stop after this many samples (the last batch is cut short);
      `data` must hold at least this many.

    labels: also yield the labels; `data` must then hold them.

  Yields:
    Tuples `(x,)` or `(x, y)`, at most `num_samples` samples in all.

  Raises:
    ValueError: if an argument is invalid or `data` yields no sample.
  """
  _check_arguments(batch_size, num_samples)
  parts = lambda element: _parts(element, labels)

  if isinstance(data, tf.data.Dataset):
    batches = (parts(element) for element in data)
  elif data is not None and _is_array_like(data):
    data = parts(data) if isinstance(data, tuple) else parts((data,))
    batches = iter(tf.data.Dataset.from_tensor_slices(data).batch(batch_size))
  else:
    raise ValueError(
        "Invalid value for argument `data`. Expected a batched "
        "`tf.data.Dataset` or an array of inputs. Received: "
        f"data of type {type(data).__name__}"
    )

  seen = 0
  for batch in batches:
    size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
    if num_samples is not None and seen + size > num_samples:
      size = num_samples - seen
      batch = tf.nest.map_structure(lambda t, n=size: t[:n], batch)
    if size == 0:
      continue
    seen += size
    yield tuple(batch)
    if num_samples is not None and seen >= num_samples:
      return
  check_count(seen, num_samples)
