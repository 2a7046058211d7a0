"""The `tf.data` pipelines that fit, evaluation and importance read.

A streaming task (`keras_mas.data.tasks.from_datasets`) holds unbatched `(x, y)`
datasets, never arrays: nothing here materializes them. Training pipelines
are shuffled in a bounded buffer, batched and prefetched; LwF's targets come
from a frozen copy of the model applied batch by batch in the pipeline; joint
rehearsal samples from every task so far. Under `MultiWorkerMirroredStrategy`
the training pipeline is sharded by element (`AutoShardPolicy.DATA`), unless
the user's dataset chose a policy of its own (e.g. `FILE` for many TFRecord
files).

Tasks held as arrays are batched here too (`array_batches`): Keras's own
array pipeline costs far more per epoch.
"""

import numpy as np
import tensorflow as tf

__all__ = ["SHUFFLE_BUFFER", "array_batches", "check_elements",
           "distillation_batches",
           "evaluation_batches", "importance_batches", "kept_samples",
           "label_check",
           "rehearsal_batches", "size", "training_batches"]

# Elements held by the shuffle buffer: enough to mix a task's order, small
# enough that memory stays flat as the dataset grows.
SHUFFLE_BUFFER = 10_000
# Labels read from each dataset before training to check their range; the
# pipeline checks every later label as it streams.
_CHECKED_ELEMENTS = 1024


def check_elements(dataset, argument, task_name, num_classes=None):
  """`(input_shape, x_dtype)` of unbatched `(x, y)` elements; raises if wrong.

  Checks the element structure and, on the first elements, the label range
  `0..num_classes−1`.

  Raises:
    ValueError: naming `argument` and the task.
  """
  if not isinstance(dataset, tf.data.Dataset):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected a tf.data.Dataset "
        f"of unbatched (x, y) elements for task {task_name!r}. Received: "
        f"{type(dataset).__name__}")
  spec = dataset.element_spec
  if (not isinstance(spec, tuple) or len(spec) != 2 or not all(
      isinstance(s, tf.TensorSpec) for s in spec)):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected (x, y) elements "
        f"of two tensors for task {task_name!r}. Received: elements {spec}")
  x_spec, y_spec = spec
  shape = x_spec.shape
  if shape.rank is None or shape.rank < 1 or None in shape.as_list():
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected unbatched inputs "
        f"of a fixed shape for task {task_name!r} (call `.unbatch()` on a "
        f"batched dataset). Received: inputs of shape {shape}")
  if not y_spec.dtype.is_integer or y_spec.shape.rank not in (0, None):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected one integer label "
        f"per element for task {task_name!r}. Received: labels of dtype "
        f"{y_spec.dtype.name}, shape {y_spec.shape}")
  if not (x_spec.dtype.is_floating or x_spec.dtype.is_integer):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected numeric inputs "
        f"for task {task_name!r}. Received: inputs of dtype "
        f"{x_spec.dtype.name}")
  if num_classes is not None:
    labels = np.concatenate([
        np.reshape(y, (-1,)) for y in dataset.take(_CHECKED_ELEMENTS).map(
            lambda x, y: y).batch(256).as_numpy_iterator()] or [
                np.zeros(0, "int64")])
    if not labels.size:
      raise ValueError(
          f"Invalid value for argument `{argument}`. Expected at least one "
          f"element for task {task_name!r}. Received: an empty dataset")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise ValueError(
          f"Invalid value for argument `{argument}`. Expected integer labels "
          f"0..{num_classes - 1} in task {task_name!r}. Received: labels "
          f"{sorted(set(bad.tolist()))[:10]} out of range")
  return tuple(shape.as_list()), x_spec.dtype


def label_check(num_classes, task_name):
  """A function of an `(x, y)` batch: float32 inputs, int64 labels checked.

  A label outside `0..num_classes−1` stops the pipeline with an
  `InvalidArgumentError` naming the task. Applied to batches, not elements:
  a check per element cost as much as parsing a TFRecord.
  """
  def check(x, y):
    y = _checked_labels(y, num_classes, task_name)
    return tf.cast(x, tf.float32), y
  return check


def _checked_labels(y, num_classes, task_name):
  y = tf.cast(y, tf.int64)
  inside = tf.reduce_all(tf.logical_and(y >= 0, y < num_classes))
  # No quotes: TensorFlow escapes them in its error.
  message = (f"Expected labels 0..{num_classes - 1} in task {task_name}. "
             "Received a label out of that range")
  with tf.control_dependencies([tf.debugging.Assert(inside, [message])]):
    return tf.identity(y)


def training_batches(dataset, batch_size, seed, shuffle_buffer=SHUFFLE_BUFFER,
                     check=None, map_batch=None):
  """Shuffled (bounded buffer, reshuffled each epoch), batched, prefetched.

  Args:
    dataset: unbatched elements.
    batch_size: the global batch size.
    seed: seeds the shuffle, the same on every worker, so that sharding by
      element splits one order.
    shuffle_buffer: elements held by the shuffle buffer.
    check: optional `label_check` applied to each batch.
    map_batch: optional function applied to each `(x, y)` batch after it.

  Returns:
    The pipeline `fit` reads.
  """
  dataset = dataset.shuffle(shuffle_buffer, seed=seed,
                            reshuffle_each_iteration=True).batch(batch_size)
  if check is not None:
    dataset = dataset.map(check)
  if map_batch is not None:
    dataset = dataset.map(map_batch)
  return _sharded(dataset).prefetch(tf.data.AUTOTUNE)


def array_batches(x, y, batch_size, seed, drop_remainder=False,
                  multiple_of=1):
  """In-memory arrays as `fit` batches them, reshuffled every epoch.

  A full shuffle of the sample indices (seeded), each batch gathered from the
  arrays: what `fit(x, y, shuffle=True)` does, in another random order, for
  about half its cost per epoch (benchmarks/CHOICES.md).

  Each new iterator draws the next order, so the orders are the same under a
  `tf.distribute` strategy as on one device as long as nothing else iterates
  the dataset (`MASModel` builds from its shapes, not from a batch drawn
  from it). Under a strategy each batch is the global batch, sharded by data.

  Args:
    x: the inputs, an array of samples.
    y: the labels or targets, an array with as many rows.
    batch_size: samples per batch; the last batch holds the remainder.
    seed: seeds the shuffle.
    drop_remainder: leave the remainder out.
    multiple_of: cut the last batch to a multiple of this many samples
      (a mesh's data-parallel devices, which share every batch equally);
      the samples left out are drawn anew each epoch. `batch_size` must be
      a multiple of it.

  Returns:
    A `tf.data.Dataset` of `(x, y)` batches, one epoch per iteration.
  """
  x = tf.convert_to_tensor(x)
  y = tf.convert_to_tensor(y)
  count = int(x.shape[0])
  dataset = (tf.data.Dataset.range(count)
             .shuffle(count, seed=seed, reshuffle_each_iteration=True)
             .take(kept_samples(count, batch_size, multiple_of))
             .batch(batch_size, drop_remainder=drop_remainder)
             .map(lambda index: (tf.gather(x, index), tf.gather(y, index)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
  return _sharded(dataset).prefetch(tf.data.AUTOTUNE)


def kept_samples(count, batch_size, multiple_of):
  """How many of `count` samples an epoch keeps when its last batch is cut
  to a multiple of `multiple_of` (every other batch is `batch_size`)."""
  return count - (count % batch_size) % multiple_of


def distillation_batches(dataset, frozen, old_slice, batch_size, seed,
                         shuffle_buffer=SHUFFLE_BUFFER, check=None):
  """Batches `(x, [y, old logits...])` for LwF's `DistillationLoss`.

  The old logits come from `frozen` (a copy of the model made before the
  task, never trained) applied to each batch in the pipeline: no task's
  logits are ever held whole.

  Args:
    dataset: unbatched `(x, y)` elements.
    frozen: the copy of the model.
    old_slice: `(start, stop)` of the outputs to distil.
    batch_size: the global batch size.
    seed: seeds the shuffle.
    shuffle_buffer: elements held by the shuffle buffer.
    check: optional `label_check` applied to each batch.
  """
  start, stop = old_slice

  def targets(x, y):
    old = tf.cast(frozen(x, training=False)[:, start:stop], tf.float32)
    return x, tf.concat([tf.cast(y, tf.float32)[:, None], old], axis=1)

  return training_batches(dataset, batch_size, seed, shuffle_buffer,
                          check=check, map_batch=targets)


def rehearsal_batches(parts, batch_size, seed, shuffle_buffer=SHUFFLE_BUFFER):
  """Joint training on several tasks: `(x, [target, start, stop])` batches.

  Args:
    parts: `(dataset, label_shift, start, stop, size, num_classes, name)`
      per task: its unbatched `(x, y)` elements, what to add to a label to
      get its output index, the outputs `[start, stop)` its samples compete
      over (see `heads.MixedTaskLoss`), its number of elements or None if
      unknown, and its class count and name (to check its labels).
    batch_size: the global batch size.
    seed: seeds the sampling and the shuffle.
    shuffle_buffer: elements held by the shuffle buffer.

  Returns:
    Batches sampling every task in proportion to its size (equally when a
    size is unknown) until all are exhausted.
  """
  datasets = []
  for dataset, shift, start, stop, _, num_classes, name in parts:
    def target(x, y, shift=shift, start=start, stop=stop,
               num_classes=num_classes, name=name):
      # Unbatched: `y` is a scalar.
      y = _checked_labels(y, num_classes, name)
      return tf.cast(x, tf.float32), tf.stack([
          y + shift, tf.constant(start, tf.int64),
          tf.constant(stop, tf.int64)])
    datasets.append(dataset.map(target))
  sizes = [p[4] for p in parts]
  weights = (None if None in sizes else
             [s / sum(sizes) for s in sizes])
  mixed = tf.data.Dataset.sample_from_datasets(
      datasets, weights=weights, seed=seed, stop_on_empty_dataset=False)
  return training_batches(mixed, batch_size, seed, shuffle_buffer)


def importance_batches(dataset, input_shape, label_shift=None, check=None):
  """Batches of inputs (or `(x, y + label_shift)`) for `consolidate`.

  Batched by input size as `importance.default_batch_size` batches arrays;
  `check` (a `label_check`) is applied to each batch.
  """
  from keras_mas import importance  # pylint: disable=g-import-not-at-top
  dataset = dataset.batch(importance.default_batch_size(
      tf.TensorSpec((None,) + tuple(input_shape))))
  if check is not None:
    dataset = dataset.map(check)
  if label_shift is None:
    dataset = dataset.map(lambda x, y: x)
  else:
    dataset = dataset.map(lambda x, y: (x, tf.cast(y, tf.int64) + label_shift))
  return dataset.prefetch(tf.data.AUTOTUNE)


def evaluation_batches(dataset, batch_size, check=None):
  """`(x, y)` NumPy batches of a test dataset, for scoring batch by batch."""
  dataset = dataset.batch(batch_size)
  if check is not None:
    dataset = dataset.map(check)
  return dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def size(dataset):
  """The number of elements when TensorFlow knows it, else None."""
  count = int(dataset.cardinality())
  return count if count >= 0 else None


def _sharded(dataset):
  policy = dataset.options().experimental_distribute.auto_shard_policy
  if policy != tf.data.experimental.AutoShardPolicy.AUTO:
    return dataset  # The user's choice.
  options = tf.data.Options()
  # Sharding by file (AUTO's first try) fails with fewer files than
  # workers, and makes no sense for generated data.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return dataset.with_options(options)

