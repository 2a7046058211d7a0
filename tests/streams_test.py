"""Tests of keras_mas.streams: a task sequence as one stream."""

import numpy as np
import pytest

from keras_mas import streams
from keras_mas import tasks


def _sequence(scenario="domain", sizes=(25, 30, 12)):
  data = []
  for k, n in enumerate(sizes):
    x = np.full((n, 2, 2, 1), float(k), "float32")
    x[:, 0, 0, 0] = np.arange(n)  # Each sample identifiable.
    y = np.arange(n) % 2
    data.append((x, y, x[:4], y[:4]))
  return tasks.from_arrays(data, scenario=scenario)


def test_tasks_in_order_boundaries_at_their_last_batch():
  sequence = _sequence()
  stream = streams.from_sequence(sequence, batch_size=10)
  np.testing.assert_array_equal(stream.task_ids,
                                np.repeat([0, 1, 2], [25, 30, 12]))
  for k, task in enumerate(sequence.tasks):
    np.testing.assert_array_equal(stream.x[stream.task_ids == k],
                                  task.x_train)
  # Ends at samples 25, 55, 67: in batches 3, 6, 7.
  assert stream.boundaries == [3, 6, 7] and stream.num_steps == 7
  batches = list(stream.batches())
  assert [len(x) for x, _ in batches] == [10] * 6 + [7]
  x, y = next(iter(stream.as_dataset()))
  np.testing.assert_array_equal(x.numpy(), batches[0][0])
  np.testing.assert_array_equal(y.numpy(), batches[0][1])


def test_class_incremental_labels_are_global():
  sequence = _sequence("class", sizes=(6, 6, 6))
  stream = streams.from_sequence(sequence, batch_size=4)
  for k, task in enumerate(sequence.tasks):
    np.testing.assert_array_equal(stream.y[stream.task_ids == k],
                                  task.y_train + 2 * k)


def test_blurred_transitions_mix_only_near_the_change():
  sizes = (200, 200)
  sequence = _sequence(sizes=sizes)
  abrupt = streams.from_sequence(sequence, batch_size=10)
  stream = streams.from_sequence(sequence, batch_size=10,
                                 transition_steps=6, seed=1)
  assert stream.boundaries == abrupt.boundaries
  # The same samples, reordered.
  assert sorted(map(tuple, stream.x.reshape(400, -1).tolist())) == sorted(
      map(tuple, abrupt.x.reshape(400, -1).tolist()))
  positions = np.arange(400)
  later = positions[stream.task_ids == 1]
  earlier = positions[stream.task_ids == 0]
  # ±30 samples around the change at 200: mixed there, pure elsewhere.
  assert later.min() >= 200 - 60 and earlier.max() < 200 + 60
  assert later.min() < 200 < earlier.max()
  share = [np.mean(stream.task_ids[s:s + 10]) for s in range(160, 240, 10)]
  assert share[0] < 0.5 < share[-1]


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"),
    ({"transition_steps": -1}, "transition_steps"),
    ({"transition_steps": 1.5}, "transition_steps")])
def test_bad_arguments_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    streams.from_sequence(_sequence(), **kwargs)


def test_task_incremental_is_refused():
  with pytest.raises(ValueError, match="task-incremental"):
    streams.from_sequence(_sequence("task"))


@pytest.mark.parametrize("transition_steps", [0, 7])
def test_a_pipeline_stream_is_the_array_stream(transition_steps):
  # Tasks of tf.data pipelines (a task spec, TFRecords, folders) give the
  # same batches in the same order, blurred alike, from a bounded heap;
  # a pipeline that does not know its size is counted once.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  arrays = tasks.make_sequence("digits", "split", "class", 3)
  data = []
  for k, t in enumerate(arrays.tasks):
    train = tf.data.Dataset.from_tensor_slices((t.x_train, t.y_train))
    if k == 1:
      train = train.filter(lambda x, y: True)  # Size unknown to tf.data.
    data.append((train, tf.data.Dataset.from_tensor_slices((t.x_test,
                                                             t.y_test))))
  pipelines = tasks.from_datasets(data, [t.num_classes for t in arrays.tasks],
                                  scenario="class")
  held = streams.from_sequence(arrays, batch_size=10,
                               transition_steps=transition_steps, seed=4)
  streamed = streams.from_sequence(pipelines, batch_size=10,
                                   transition_steps=transition_steps, seed=4)
  assert isinstance(streamed, streams.PipelineStream)
  assert streamed.boundaries == held.boundaries
  assert streamed.num_steps == held.num_steps
  dataset = streamed.as_dataset()
  assert int(dataset.cardinality()) == held.num_steps
  batches = list(dataset.as_numpy_iterator())
  assert len(batches) == held.num_steps
  for (x, y), (x_held, y_held) in zip(batches, held.batches()):
    np.testing.assert_array_equal(x, x_held)
    np.testing.assert_array_equal(y, y_held)


def test_a_pipeline_label_out_of_range_names_the_task():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = np.zeros((2000, 8, 8, 1), "float32")
  labels = np.zeros(2000, "int64")
  labels[-1] = 3  # Beyond the first elements, which are checked early.
  good = tf.data.Dataset.from_tensor_slices((x[:20], labels[:20]))
  bad = tf.data.Dataset.from_tensor_slices((x, labels))
  sequence = tasks.from_datasets([(good, good), (bad, good)], 2,
                                 scenario="domain", names=["a", "b"])
  # The first elements are checked when the sequence is made; the stream
  # checks every one.
  stream = streams.from_sequence(sequence, batch_size=5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="task b"):
    list(stream.as_dataset().as_numpy_iterator())
