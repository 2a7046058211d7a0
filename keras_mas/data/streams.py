"""One stream of small batches from a task sequence, its boundaries hidden.

The tasks' training data, one after the other, cut into batches: the
learner is not told where one task ends. The true boundaries come back
apart, for evaluation only (the accuracy matrix at the hidden boundaries,
oracle baselines). Transitions can be blurred: around each change, samples
of the two tasks are mixed, the next task's share rising from 0 to 1.
"""

import dataclasses
import heapq

import numpy as np
import tensorflow as tf

from keras_mas.data import pipelines

__all__ = ["PipelineStream", "Stream", "from_sequence"]

# Elements checked and shifted together in a pipeline stream: the label
# check costs as much per call as parsing a record, so it runs on chunks.
_CHECK_CHUNK = 1024


@dataclasses.dataclass
class Stream:
  """A stream: inputs and labels in stream order, and where tasks end.

  Attributes:
    x: inputs, shape `(N, ...)`, in the order the learner meets them.
    y: labels over the model's outputs (each task's `label_offset`
      applied), shape `(N,)`.
    task_ids: the task each sample came from (for evaluation only).
    batch_size: samples per incoming batch.
    boundaries: for each task, the step (number of incoming batches) after
      which its stretch ends; the last is `num_steps`.
  """
  x: np.ndarray
  y: np.ndarray
  task_ids: np.ndarray
  batch_size: int
  boundaries: list

  @property
  def num_steps(self):
    return -(-len(self.x) // self.batch_size)

  def batches(self):
    """The `(x, y)` NumPy batches, in stream order."""
    for start in range(0, len(self.x), self.batch_size):
      stop = start + self.batch_size
      yield self.x[start:stop], self.y[start:stop]

  def as_dataset(self):
    """The stream as a batched `tf.data.Dataset` of `(x, y)`, in order."""
    return tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(
        self.batch_size)


@dataclasses.dataclass
class PipelineStream:
  """A stream read from the tasks' `tf.data` pipelines, never held whole.

  The same stream as `Stream` would hold for the same data (the same
  order, the same blur), for tasks of `tf.data` pipelines
  (`keras_mas.data.tasks.from_datasets`, or a task spec's TFRecords or
  datasets: `tfds.load(..., as_supervised=True)`, an image folder's
  `keras.utils.image_dataset_from_directory(...).unbatch()`): memory stays
  flat as the stream grows.

  Attributes:
    tasks: per task, a dataset of unbatched `(x, y)`: float32 inputs, labels
      over the model's outputs (checked, each task's `label_offset` and
      `start` added).
    sizes: each task's number of training elements.
    batch_size: samples per incoming batch.
    boundaries: as `Stream.boundaries`.
    transition_steps: the blur, as `from_sequence`'s.
    seed: seeds the blur.
  """
  tasks: list
  sizes: list
  batch_size: int
  boundaries: list
  transition_steps: int = 0
  seed: int = 0

  @property
  def num_steps(self):
    return -(-sum(self.sizes) // self.batch_size)

  def as_dataset(self):
    """The stream as a batched `tf.data.Dataset` of `(x, y)`, in order."""
    if not self.transition_steps:
      stream = self.tasks[0]
      for task in self.tasks[1:]:
        stream = stream.concatenate(task)
    else:
      spec = self.tasks[0].element_spec
      stream = tf.data.Dataset.from_generator(self._blurred,
                                              output_signature=spec)
    # The size is known (counted when the pipeline did not say): told to
    # tf.data, Keras's `fit` knows its steps and does not warn at the end.
    return stream.batch(self.batch_size).apply(
        tf.data.experimental.assert_cardinality(self.num_steps)).prefetch(
            tf.data.AUTOTUNE)

  def _blurred(self):
    """The elements in `Stream`'s blurred order, from a bounded heap.

    Each element's key is its place plus the same uniform jitter
    `from_sequence` draws for arrays (drawn in chunks: the generator gives
    the same numbers); a key is never below its place − half, so once the
    next place to read is beyond a key + half, nothing read later can come
    before it. The heap holds about `transition_steps · batch_size`
    elements.
    """
    half = self.transition_steps * self.batch_size / 2.0
    rng = np.random.default_rng(self.seed)
    heap, place = [], 0
    for task in self.tasks:
      for chunk in task.batch(_CHECK_CHUNK).as_numpy_iterator():
        keys = place + np.arange(len(chunk[1])) + rng.uniform(
            -half, half, len(chunk[1]))
        for i, key in enumerate(keys):
          heapq.heappush(heap, (key, place + i, chunk[0][i], chunk[1][i]))
        place += len(chunk[1])
        while heap and heap[0][0] < place - half:
          yield heapq.heappop(heap)[2:]
    while heap:
      yield heapq.heappop(heap)[2:]


def _shifted(task):
  """A function of an `(x, y)` chunk: `label_check`'s, then labels over
  the model's outputs."""
  check = pipelines.label_check(task.num_classes, task.name)
  shift = task.label_offset + task.start

  def shifted(x, y):
    x, y = check(x, y)
    return x, y + shift
  return shifted


def _pipeline_stream(sequence, batch_size, transition_steps, seed):
  """`from_sequence` for tasks of `tf.data` pipelines."""
  tasks, sizes = [], []
  for task in sequence.tasks:
    data = task.dataset("train").batch(_CHECK_CHUNK).map(
        _shifted(task)).unbatch()
    size = task.train_size
    if size is None:
      # The boundaries are needed before the stream runs: one pass counts.
      size = int(data.reduce(np.int64(0), lambda n, _: n + 1))
    tasks.append(data)
    sizes.append(size)
  ends = np.cumsum(sizes)
  boundaries = [int(-(-end // batch_size)) for end in ends]
  return PipelineStream(tasks, sizes, int(batch_size), boundaries,
                        int(transition_steps), seed)


def from_sequence(sequence, batch_size=10, transition_steps=0, seed=0):
  """Concatenates a task sequence's training data into one stream.

  Example:

  ```python
  sequence = keras_mas.data.tasks.make_sequence("digits", "split", "domain", 5)
  stream = keras_mas.data.streams.from_sequence(sequence, batch_size=10)
  for x, y in stream.batches():
    ...
  stream.boundaries  # e.g. [29, 58, 87, 116, 144]
  ```

  Args:
    sequence: a `keras_mas.data.tasks.TaskSequence` (domain- or
      class-incremental: a task-free learner is never told a task id).
    batch_size: samples per incoming batch.
    transition_steps: blur each change over about this many batches: a
      sample's place is jittered uniformly by up to half that many batches
      either way, so that the next task's share rises linearly across the
      change. 0: abrupt changes.
    seed: seeds the blur.

  Returns:
    A `Stream`.

  Raises:
    ValueError: naming the argument, for a task-incremental sequence or a
      bad batch size or transition length.
  """
  if sequence.scenario == "task":
    raise ValueError(
        "Invalid value for argument `sequence`. Expected a domain- or "
        "class-incremental sequence: a task-free stream never says which "
        "task a sample is from, so task-incremental heads cannot be chosen. "
        "Received: scenario='task'")
  if (isinstance(batch_size, bool) or not isinstance(batch_size,
                                                     (int, np.integer))
      or batch_size < 1):
    raise ValueError(
        "Invalid value for argument `batch_size`. Expected a positive "
        f"integer. Received: batch_size={batch_size!r}")
  if (isinstance(transition_steps, bool)
      or not isinstance(transition_steps, (int, np.integer))
      or transition_steps < 0):
    raise ValueError(
        "Invalid value for argument `transition_steps`. Expected an integer "
        f">= 0. Received: transition_steps={transition_steps!r}")
  if sequence.streaming:
    return _pipeline_stream(sequence, batch_size, transition_steps, seed)
  x = np.concatenate([t.x_train for t in sequence.tasks])
  y = np.concatenate([t.y_train.astype("int64") + t.label_offset + t.start
                      for t in sequence.tasks])
  task_ids = np.concatenate([np.full(len(t.x_train), k, "int64")
                             for k, t in enumerate(sequence.tasks)])
  ends = np.cumsum([len(t.x_train) for t in sequence.tasks])
  if transition_steps:
    half = transition_steps * batch_size / 2.0
    rng = np.random.default_rng(seed)
    keys = np.arange(len(x)) + rng.uniform(-half, half, len(x))
    order = np.argsort(keys, kind="stable")
    x, y, task_ids = x[order], y[order], task_ids[order]
  # The change point of task k -> k+1 stays where it was; its batch is
  # the last of task k's stretch.
  boundaries = [int(-(-end // batch_size)) for end in ends]
  return Stream(x, y, task_ids, int(batch_size), boundaries)
