"""Task sequences: sources, recipes, scenarios, seeding, bad input."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import pipelines
from keras_mas import tasks


def test_digits_split_domain():
  sequence = tasks.make_sequence("digits", "split", "domain", 5, seed=1)
  assert len(sequence) == 5 and sequence.num_outputs == 2
  assert sequence.input_shape == (8, 8, 1)
  seen = set()
  for task in sequence.tasks:
    assert set(np.unique(task.y_train)) == {0, 1}
    assert task.output_slice == (0, 2) and task.label_offset == 0
    assert task.x_train.dtype == np.float32 and task.x_train.max() <= 1.0
    seen.add(task.name)
  assert len(seen) == 5
  total = sum(len(t.x_train) + len(t.x_test) for t in sequence.tasks)
  assert total == 1797


def test_task_and_class_scenarios_place_outputs():
  task_il = tasks.make_sequence("digits", "split", "task", 5)
  assert task_il.num_outputs == 10
  assert [t.output_slice for t in task_il.tasks] == [
      (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
  assert all(t.label_offset == 0 for t in task_il.tasks)
  class_il = tasks.make_sequence("digits", "split", "class", 5)
  assert [t.output_slice for t in class_il.tasks] == [
      (0, 2), (0, 4), (0, 6), (0, 8), (0, 10)]
  assert [t.label_offset for t in class_il.tasks] == [0, 2, 4, 6, 8]


def test_permuted_tasks_are_seeded_permutations_of_the_same_images():
  a = tasks.make_sequence("digits", "permuted", "domain", 3, seed=4)
  b = tasks.make_sequence("digits", "permuted", "domain", 3, seed=4)
  c = tasks.make_sequence("digits", "permuted", "domain", 3, seed=5)
  for ta, tb in zip(a.tasks, b.tasks):
    np.testing.assert_array_equal(ta.x_train, tb.x_train)
    np.testing.assert_array_equal(ta.y_train, tb.y_train)
  assert not np.array_equal(a.tasks[1].x_test, c.tasks[1].x_test)
  first, second = a.tasks[0].x_test, a.tasks[1].x_test
  np.testing.assert_array_equal(np.sort(first.reshape(len(first), -1), 1),
                                np.sort(second.reshape(len(second), -1), 1))
  np.testing.assert_array_equal(a.tasks[0].y_test, a.tasks[1].y_test)


def test_rotated_first_task_is_unrotated_and_last_is_rotated():
  sequence = tasks.make_sequence("digits", "rotated", "domain", 3,
                                 max_angle=90)
  source = tasks.load_source("digits")
  np.testing.assert_array_equal(np.sort(sequence.tasks[0].x_test.ravel()),
                                np.sort(source[2].ravel()))
  # Rotating an 8×8 digit by 90° about its centre is an exact rot90.
  np.testing.assert_allclose(
      sequence.tasks[2].x_test,
      np.rot90(sequence.tasks[0].x_test, k=1, axes=(1, 2)), atol=1e-5)
  assert sequence.tasks[2].name == "rotation 90"
  assert not np.allclose(sequence.tasks[0].x_test, sequence.tasks[2].x_test)


def test_tfds_sources_load_offline_under_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=40):
    split = tasks.make_sequence("mnist", "split", "class", 5)
    assert split.input_shape == (28, 28, 1) and split.num_outputs == 10
    several = tasks.make_sequence("mnist,fashion_mnist", "datasets", "task")
    assert len(several) == 2 and several.num_outputs == 20
    assert several.tasks[1].output_slice == (10, 20)


def test_a_tfds_dataset_prepared_on_disk_loads_for_real(tmp_path):
  # The real tfds.load path (not mock_data): it imports what setup.py must
  # declare (importlib_resources) and reads TFRecords from data_dir.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def split(n):
    return tf.data.Dataset.from_tensor_slices({
        "image": rng.integers(0, 256, (n, 6, 6, 1)).astype("uint8"),
        "label": np.arange(n) % 4})

  train, test = split(24), split(8)
  tfds.dataset_builders.TfDataBuilder(
      name="keras_mas_tiny", version="1.0.0", data_dir=str(tmp_path),
      split_datasets={"train": train, "test": test},
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(6, 6, 1)),
          "label": tfds.features.ClassLabel(num_classes=4)}),
  ).download_and_prepare()
  sequence = tasks.make_sequence("keras_mas_tiny", "split", "task", 2,
                                 data_dir=str(tmp_path))
  assert sequence.input_shape == (6, 6, 1) and sequence.num_outputs == 4
  half = tasks.make_sequence("keras_mas_tiny", "split", "task", 2,
                             data_dir=str(tmp_path),
                             splits=("train[:50%]", "test"))
  assert sum(len(t.x_train) for t in half.tasks) == 12
  with pytest.raises(ValueError, match="argument `splits`.*'test', 'train'"):
    tasks.load_source("keras_mas_tiny", data_dir=str(tmp_path),
                      splits=("train", "validation"))
  with pytest.raises(ValueError, match="argument `splits`"):
    tasks.load_source("digits", splits=("train", "test"))
  x_train, y_train, _, _ = tasks.load_source("keras_mas_tiny",
                                             data_dir=str(tmp_path))
  expected = {(tuple(e["image"].ravel()), int(e["label"]))
              for e in train.as_numpy_iterator()}
  loaded = {(tuple(np.round(x.ravel() * 255).astype("uint8")), int(y))
            for x, y in zip(x_train, y_train)}
  assert loaded == expected


def test_from_arrays_places_the_users_tasks_like_a_recipe():
  rng = np.random.default_rng(0)

  def task(classes, n=12):
    return (rng.random((n, 5, 5, 3)), np.arange(n) % classes,
            rng.random((4, 5, 5, 3)), np.arange(4) % classes)

  sequence = tasks.from_arrays([task(3), task(2)], scenario="task",
                               names=["cats", "dogs"])
  assert [t.output_slice for t in sequence.tasks] == [(0, 3), (3, 5)]
  assert sequence.num_outputs == 5 and sequence.input_shape == (5, 5, 3)
  assert [t.name for t in sequence.tasks] == ["cats", "dogs"]
  assert sequence.tasks[0].x_train.dtype == np.float32
  domain = tasks.from_arrays([task(3), task(2)], scenario="domain")
  assert [t.output_slice for t in domain.tasks] == [(0, 3), (0, 3)]


@pytest.mark.parametrize("change, message", [
    (lambda d: d[:0], "one or more tasks"),
    (lambda d: [d[0], (d[1][0][:, :4],) + d[1][1:]], r"\(4, 5, 3\) in task"),
    (lambda d: [d[0], (d[1][0], d[1][1] - 5) + d[1][2:]], "smallest -5"),
    (lambda d: [d[0], (d[1][0], d[1][1][:3]) + d[1][2:]], "N labels"),
])
def test_from_arrays_names_bad_tasks(change, message):
  rng = np.random.default_rng(0)
  data = [(rng.random((6, 5, 5, 3)), np.arange(6) % 2,
           rng.random((2, 5, 5, 3)), np.arange(2)) for _ in range(2)]
  with pytest.raises(ValueError, match=message):
    tasks.from_arrays(change(data))


@pytest.mark.parametrize("kwargs, argument", [
    ({"dataset": "no_such_dataset_xyz"}, "dataset"),
    ({"recipe": "shuffled"}, "recipe"),
    ({"scenario": "online"}, "scenario"),
    ({"num_tasks": 6}, "num_tasks"),
    ({"num_tasks": 1, "recipe": "permuted"}, "num_tasks"),
])
def test_bad_arguments_are_named(kwargs, argument):
  arguments = {"dataset": "digits", "recipe": "split", "scenario": "domain",
               "num_tasks": 5}
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=f"argument `{argument}`"):
    tasks.make_sequence(**arguments)


def _datasets(rng, classes=(3, 2), shape=(5, 5, 1), n=12):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [tuple(tf.data.Dataset.from_tensor_slices(
      (rng.random((size,) + shape).astype("float32"),
       np.arange(size) % c)) for size in (n, 4)) for c in classes]


def test_from_datasets_places_streaming_tasks_like_arrays():
  rng = np.random.default_rng(0)
  data = _datasets(rng)
  sequence = tasks.from_datasets(data, num_classes=[3, 2], scenario="class",
                                 names=["a", "b"])
  assert sequence.streaming and sequence.recipe == "datasets"
  assert [t.output_slice for t in sequence.tasks] == [(0, 3), (0, 5)]
  assert [t.label_offset for t in sequence.tasks] == [0, 3]
  assert sequence.num_outputs == 5 and sequence.input_shape == (5, 5, 1)
  task = sequence.tasks[1]
  assert task.x_train is None and task.train_size == 12
  x, y = next(iter(task.dataset("train").batch(12)))
  expected_x, expected_y = next(iter(data[1][0].batch(12)))
  np.testing.assert_array_equal(x, expected_x)
  np.testing.assert_array_equal(y, expected_y)
  assert y.dtype == np.int64
  domain = tasks.from_datasets(data, num_classes=[3, 2], scenario="domain")
  assert [t.output_slice for t in domain.tasks] == [(0, 3), (0, 3)]
  assert not tasks.make_sequence("digits", "split", "task", 2).streaming


def test_streaming_labels_are_checked_as_they_stream():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The first 1,024 labels are checked before training; a bad one later
  # stops the pipeline, naming the task.
  x = np.zeros((1100, 2), "float32")
  y = np.zeros(1100, "int64")
  y[1050] = 7
  good = tf.data.Dataset.from_tensor_slices((x[:4], y[:4]))
  late = tf.data.Dataset.from_tensor_slices((x, y))
  sequence = tasks.from_datasets([(good, good), (late, good)], num_classes=2,
                                 names=["a", "late"])
  task = sequence.tasks[1]
  for batches in (
      pipelines.training_batches(task.train_data, 512, 0,
                                 check=task.label_check),
      pipelines.importance_batches(task.train_data, (2,),
                                   check=task.label_check),
      pipelines.evaluation_batches(task.train_data, 512, task.label_check)):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="Expected labels 0..1 in task late"):
      for _ in batches:
        pass


@pytest.mark.parametrize("change, message", [
    (lambda d: d[:0], "one or more tasks"),
    (lambda d: [d[0], (d[1][0].batch(4), d[1][1])],
     r"unbatched inputs of a fixed shape.*\.unbatch\(\)"),
    (lambda d: [d[0], (d[1][0].map(lambda x, y: (x[:4], y)), d[1][1])],
     r"\(4, 5, 1\) in task 'task 1'"),
    (lambda d: [d[0], (d[1][0].map(lambda x, y: (x, y + 5)), d[1][1])],
     r"labels 0..1 in task 'task 1'. Received: labels \[5, 6\]"),
    (lambda d: [d[0], (d[1][0].map(lambda x, y: (x, 1.0)), d[1][1])],
     "one integer label"),
    (lambda d: [d[0], (d[1][0].map(lambda x, y: x), d[1][1])],
     r"\(x, y\) elements"),
    (lambda d: [d[0], (d[1][0].take(0), d[1][1])], "empty dataset"),
    (lambda d: [d[0], (np.zeros(3), d[1][1])], "Received: ndarray"),
])
def test_from_datasets_names_bad_tasks(change, message):
  data = _datasets(np.random.default_rng(0))
  with pytest.raises(ValueError, match=message):
    tasks.from_datasets(change(data), num_classes=[3, 2])
  with pytest.raises(ValueError, match="argument `num_classes`"):
    tasks.from_datasets(data, num_classes=0)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
