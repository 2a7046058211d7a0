"""run_sequence: the loop, its outputs, resume, old heads, bad input."""

import glob
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_mas
from keras_mas import checkpoints
from keras_mas import sources
from keras_mas import tasks
from keras_mas import training
from keras_mas.experiments import evaluation

tf.config.experimental.enable_op_determinism()


def _tiny(scenario="domain", recipe="split", num_tasks=3):
  sequence = tasks.make_sequence("digits", recipe, scenario, num_tasks)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:64], task.y_train[:64]
    task.x_test, task.y_test = task.x_test[:32], task.y_test[:32]
  return sequence


_FAST = {"epochs": 1, "batch_size": 16, "hidden_units": 16, "verbose": 0}


def _tags(logdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  tags = set()
  for events in glob.glob(os.path.join(logdir, "**", "events.*"),
                          recursive=True):
    accumulator = event_accumulator.EventAccumulator(events, size_guidance={
        event_accumulator.TENSORS: 0})
    accumulator.Reload()
    for kind_tags in accumulator.Tags().values():
      if isinstance(kind_tags, list):
        tags.update(kind_tags)
  return tags


def test_run_writes_results_checkpoints_exports_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  results = training.run_sequence(_tiny(), workdir, method="mas", **_FAST)
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(results))
  for key in ("method", "dataset", "scenario", "tasks", "accuracy_matrix",
              "acc", "bwt", "fwt", "forgetting", "timings", "config"):
    assert key in saved
  matrix = np.array(saved["accuracy_matrix"])
  assert matrix.shape == (3, 3) and np.all((matrix >= 0) & (matrix <= 1))
  assert saved["acc"] == pytest.approx(matrix[-1].mean())
  for k in range(3):
    assert os.path.isfile(os.path.join(workdir, "checkpoints", f"task_{k}",
                                       "model.keras"))
    assert os.path.isfile(os.path.join(workdir, "export", f"task_{k}",
                                       "saved_model.pb"))
  tags = _tags(os.path.join(workdir, "tensorboard"))
  for tag in ("epoch_loss", "epoch_mas_penalty", "epoch_task_loss",
              "accuracy/task_0", "sequence/acc", "sequence/forgetting",
              "accuracy_matrix", "importance/hidden_0/kernel",
              "drift/hidden_0", "drift/logits"):
    assert tag in tags, (tag, sorted(tags))


def test_resume_reaches_the_same_results_as_an_uninterrupted_run(
    tmp_path, monkeypatch):
  sequence = _tiny()
  whole = training.run_sequence(sequence, str(tmp_path / "whole"), **_FAST)

  crashed = str(tmp_path / "crashed")
  real_export = training._export

  def crash_after_task_1(net, workdir, seq, k):
    if k == 1:
      raise KeyboardInterrupt("simulated crash")
    real_export(net, workdir, seq, k)

  monkeypatch.setattr(training, "_export", crash_after_task_1)
  with pytest.raises(KeyboardInterrupt):
    training.run_sequence(sequence, crashed, **_FAST)
  monkeypatch.setattr(training, "_export", real_export)
  with pytest.raises(ValueError, match="argument `workdir`.*resume"):
    training.run_sequence(sequence, crashed, **_FAST)
  resumed = training.run_sequence(sequence, crashed, resume=True, **_FAST)
  np.testing.assert_allclose(resumed["accuracy_matrix"],
                             whole["accuracy_matrix"])
  for key in ("acc", "bwt", "fwt", "forgetting"):
    assert resumed[key] == pytest.approx(whole[key])
  a = keras.models.load_model(os.path.join(
      str(tmp_path / "whole"), "checkpoints", "task_2", "model.keras"))
  b = keras.models.load_model(os.path.join(
      crashed, "checkpoints", "task_2", "model.keras"))
  for x, y in zip(a.importances + a.anchors, b.importances + b.anchors):
    np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-7)


def test_export_last_or_none_and_no_histograms_write_only_what_is_asked(
    tmp_path, monkeypatch):
  sequence = _tiny()
  last = str(tmp_path / "last")
  real_export = training._export

  def crash_in_last_export(exporter, workdir, seq, k):
    raise KeyboardInterrupt(f"simulated crash exporting task {k}")

  monkeypatch.setattr(training, "_export", crash_in_last_export)
  with pytest.raises(KeyboardInterrupt, match="exporting task 2"):
    training.run_sequence(sequence, last, export="last",
                          importance_histograms=False, **_FAST)
  monkeypatch.setattr(training, "_export", real_export)
  # The resume (which may change these settings) writes the missing export.
  results = training.run_sequence(sequence, last, export="last",
                                  importance_histograms=False, resume=True,
                                  **_FAST)
  assert sorted(os.listdir(os.path.join(last, "export"))) == ["task_2"]
  assert os.path.isfile(os.path.join(last, "export", "task_2",
                                     "saved_model.pb"))
  tags = _tags(os.path.join(last, "tensorboard"))
  assert "sequence/acc" in tags and "drift/hidden_0" in tags
  assert not any(t.startswith("importance/") for t in tags), sorted(tags)
  assert "export" not in results["config"]

  none = str(tmp_path / "none")
  training.run_sequence(sequence, none, export="none", **_FAST)
  assert not os.path.exists(os.path.join(none, "export"))
  assert "importance/hidden_0/kernel" in _tags(os.path.join(none,
                                                            "tensorboard"))


@pytest.mark.parametrize("method", ["mas", "finetune"])
def test_earlier_task_heads_stay_exactly_as_they_were(tmp_path, method):
  workdir = str(tmp_path / method)
  training.run_sequence(_tiny("task"), workdir, method=method,
                        optimizer="adam", **_FAST)

  def head_0(k):
    model = keras.models.load_model(os.path.join(
        workdir, "checkpoints", f"task_{k}", "model.keras"))
    logits = model.get_layer("logits")
    return logits.kernel.numpy()[:, :2], logits.bias.numpy()[:2]

  kernel_0, bias_0 = head_0(0)
  for k in (1, 2):
    kernel, bias = head_0(k)
    np.testing.assert_array_equal(kernel, kernel_0)
    np.testing.assert_array_equal(bias, bias_0)


def test_local_mas_and_class_incremental_run(tmp_path):
  results = training.run_sequence(
      _tiny("class", num_tasks=2), str(tmp_path / "l"), method="local_mas",
      **_FAST)
  assert np.array(results["accuracy_matrix"]).shape == (2, 2)


@pytest.mark.parametrize("kwargs, argument", [
    ({"method": "sgd_magic"}, "method"),
    ({"strength": -1.0}, "strength"),
    ({"epochs": 0}, "epochs"),
    ({"optimizer": "no_such_optimizer"}, "optimizer"),
    ({"model": "transformer9000"}, "model"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"hidden_units": 0}, "hidden_units"),
    ({"export": "sometimes"}, "export"),
    ({"importance_histograms": "no"}, "importance_histograms"),
    ({"weights": "/no/such/file.h5", "model": "mobilenetv2"}, "weights"),
    ({"freeze_backbone": True}, "weights`/`freeze_backbone"),
    ({"model": keras.Sequential([keras.Input((4, 4, 1)),
                                 keras.layers.Flatten(),
                                 keras.layers.Dense(2)])}, "model"),
    ({"model": keras.Sequential([keras.Input((8, 8, 1)),
                                 keras.layers.Flatten(),
                                 keras.layers.Dense(1)])}, "model"),
])
def test_bad_arguments_fail_before_training(tmp_path, kwargs, argument):
  arguments = dict(_FAST)
  arguments.update(kwargs)
  workdir = str(tmp_path / "w")
  with pytest.raises(ValueError, match=f"argument `{argument}`"):
    training.run_sequence(_tiny(num_tasks=2), workdir, **arguments)
  assert not os.path.exists(workdir)


def test_labels_out_of_range_are_named_before_training(tmp_path):
  sequence = _tiny(num_tasks=2)
  sequence.tasks[1].y_train = sequence.tasks[1].y_train.copy()
  sequence.tasks[1].y_train[:3] = [7, 5, -1]  # Five classes: 0..4.
  with pytest.raises(ValueError, match=r"task 1 .*\[-1, 5, 7\] out of range"):
    training.run_sequence(sequence, str(tmp_path / "w"), method="ewc",
                          **_FAST)
  assert not os.path.exists(str(tmp_path / "w"))


def test_the_users_own_model_is_copied_not_trained_in_place(tmp_path):
  keras.utils.set_random_seed(0)
  own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(12, activation="relu"),
                          keras.layers.Dense(5)], name="mine")
  before = [w.numpy() for w in own.weights]
  runs = [training.run_sequence(_tiny(num_tasks=2),
                                str(tmp_path / f"run{i}"), model=own,
                                method="mas", **_FAST) for i in range(2)]
  for a, b in zip(before, own.weights):
    np.testing.assert_array_equal(a, b.numpy())
  assert runs[0]["config"]["model"] == "custom:mine"
  # Both runs started from the same weights, so they agree.
  assert runs[0]["accuracy_matrix"] == runs[1]["accuracy_matrix"]


def test_unwritable_workdir_and_foreign_resume_are_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="argument `workdir`.*writable"):
    training.run_sequence(_tiny(num_tasks=2), str(blocker / "sub"), **_FAST)

  workdir = str(tmp_path / "run")
  training.run_sequence(_tiny(num_tasks=2), workdir, **_FAST)
  listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with open(os.path.join(workdir, "results.json")) as f:
    before = f.read()
  with pytest.raises(ValueError, match="argument `resume`.*strength"):
    training.run_sequence(_tiny(num_tasks=2), workdir, resume=True,
                          strength=5.0, **_FAST)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing
  with open(os.path.join(workdir, "results.json")) as f:
    assert f.read() == before


def test_partial_checkpoint_writes_are_ignored_with_a_warning(tmp_path):
  workdir = str(tmp_path / "run")
  training.run_sequence(_tiny(num_tasks=2), workdir, **_FAST)
  os.makedirs(os.path.join(workdir, "checkpoints", ".task_2.partial-x"))
  with pytest.warns(UserWarning, match="partial checkpoint"):
    latest = checkpoints.latest(workdir)
  assert latest[0] == 1


def _streamed(sequence, known_size=True):
  """`sequence` as streaming tasks; without a known size if asked."""
  def part(task, split):
    dataset = task.dataset(split)
    return dataset if known_size else dataset.filter(lambda x, y: True)
  return tasks.from_datasets(
      [(part(t, "train"), part(t, "test")) for t in sequence.tasks],
      num_classes=[t.num_classes for t in sequence.tasks],
      scenario=sequence.scenario)


@pytest.mark.parametrize("method, scenario, known_size", [
    ("mas", "domain", False), ("lwf", "task", True), ("joint", "task", True)])
def test_streaming_tasks_train_evaluate_and_consolidate(
    tmp_path, monkeypatch, method, scenario, known_size):
  arrays = _tiny(scenario, num_tasks=2)
  streamed = _streamed(arrays, known_size)
  compiles = []
  compile_model = keras_mas.MASModel.compile

  def counting(self, *args, **kwargs):
    compiles.append(1)
    return compile_model(self, *args, **kwargs)

  monkeypatch.setattr(keras_mas.MASModel, "compile", counting)
  results = training.run_sequence(streamed, str(tmp_path), method=method,
                                  **dict(_FAST, epochs=4))
  monkeypatch.undo()
  matrix = np.array(results["accuracy_matrix"])
  assert matrix[0, 0] > 1.5 / arrays.tasks[0].num_classes  # chance: 1/C
  # Streamed evaluation scores exactly as evaluation on the arrays.
  model = checkpoints.load_model(
      os.path.join(str(tmp_path), "checkpoints", "task_1"))
  np.testing.assert_array_equal(
      evaluation.task_accuracies(model, arrays, 16, trained=1),  # pylint: disable=protected-access
      matrix[1])
  if method == "mas":
    assert model.consolidated_tasks == 2
    assert all(np.any(o.numpy() > 0) for o in model.importances)
    # The same loss for both tasks: compiled once, not retraced per task.
    assert len(compiles) == 1


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


class _FixedLogits:
  """Stands in for a model: the same logits for every input."""

  def __init__(self, logits):
    self.logits = np.asarray(logits, "float32")

  def __call__(self, x, training=False):
    del training
    return tf.tile(self.logits[None], [tf.shape(x)[0], 1])


def test_class_incremental_scores_over_every_class_seen():
  sequence = _tiny("class", num_tasks=2)  # classes 0-4, then 5-9
  # Predicts class 1 among the first task's outputs, but class 7 overall.
  net = _FixedLogits([0, 5, 0, 0, 0, 0, 0, 9, 0, 0])
  after_first = evaluation.task_accuracies(net, sequence, 16, trained=0)
  after_second = evaluation.task_accuracies(net, sequence, 16, trained=1)
  task_0 = sequence.tasks[0]
  assert after_first[0] == pytest.approx(np.mean(task_0.y_test == 1))
  assert after_second[0] == 0.0  # class 7 now competes, and wins
  assert after_second[1] == pytest.approx(
      np.mean(sequence.tasks[1].y_test + 5 == 7))
  task_il = _tiny("task", num_tasks=2)
  assert evaluation.task_accuracies(net, task_il, 16, trained=1)[0] == (
      pytest.approx(np.mean(task_il.tasks[0].y_test == 1)))


def _deployed_model(sequence):
  keras.utils.set_random_seed(1)
  own = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                          keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(sequence.num_outputs)],
                         name="deployed")
  own.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
  old = sequence.tasks[0]
  own.fit(old.x_train, old.y_train, epochs=5, verbose=0)
  return own, (old.x_test, old.y_test)


def _deployed_and_later(num_tasks):
  """A model trained on task 0, its test data and accuracy, and the later
  tasks as a domain-incremental sequence."""
  sequence = _tiny(recipe="permuted", num_tasks=num_tasks)
  own, old = _deployed_model(sequence)
  deployed_accuracy = float(np.mean(
      np.argmax(own.predict(old[0], verbose=0), -1) == old[1]))
  later = tasks.from_arrays(
      [(t.x_train, t.y_train, t.x_test, t.y_test)
       for t in sequence.tasks[1:]], scenario="domain")
  return own, old, deployed_accuracy, later


def test_importance_data_protects_a_deployed_model_from_the_start(tmp_path):
  own, old, deployed_accuracy, later = _deployed_and_later(num_tasks=3)
  workdir = str(tmp_path / "run")
  results = training.run_sequence(later, workdir, model=own, method="mas",
                                  strength=1.0, importance_data=old, **_FAST)
  accuracy = results["importance_data_accuracy"]
  assert len(accuracy) == 3 and accuracy[0] == pytest.approx(
      deployed_accuracy)
  assert results["config"]["importance_data"] == {"samples": 32,
                                                  "labels": True}
  first = keras.models.load_model(
      os.path.join(workdir, "checkpoints", "task_0", "model.keras"))
  assert first.consolidated_tasks == 2  # The deployed data, then task 0.
  unlabeled = training.run_sequence(later, str(tmp_path / "u"), model=own,
                                    method="mas", importance_data=old[0],
                                    **_FAST)
  assert "importance_data_accuracy" not in unlabeled


@pytest.mark.parametrize("method", ["finetune", "si"])
def test_importance_data_reports_the_baseline_of_any_method(tmp_path, method):
  # Fine-tuning the deployed model on the new task is what MAS is compared
  # with: its accuracy on the deployed data is reported the same way, and
  # nothing is consolidated on it.
  own, old, deployed_accuracy, later = _deployed_and_later(num_tasks=2)
  workdir = str(tmp_path / "run")
  results = training.run_sequence(later, workdir, model=own, method=method,
                                  importance_data=old, **_FAST)
  accuracy = results["importance_data_accuracy"]
  assert len(accuracy) == 2
  assert accuracy[0] == pytest.approx(deployed_accuracy)
  assert results["config"]["importance_data"] == {"samples": 32,
                                                  "labels": True}
  first = keras.models.load_model(
      os.path.join(workdir, "checkpoints", "task_0", "model.keras"))
  # SI consolidates its path after the task; fine-tuning never.
  assert first.consolidated_tasks == (1 if method == "si" else 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"importance_data": np.zeros((4, 6, 6, 1))}, r"shape \(8, 8, 1\)"),
    ({"importance_data": (np.zeros((4, 8, 8, 1)), np.array([0, 1, 10, 0]))},
     r"0\.\.9"),
    ({"importance_data": np.zeros((4, 8, 8, 1)), "method": "ewc"},
     "Expected labels"),
])
def test_bad_importance_data_is_named_before_training(tmp_path, kwargs,
                                                      message):
  arguments = {"method": "mas", **_FAST, **kwargs}
  with pytest.raises(ValueError, match=f"`importance_data`.*{message}"):
    training.run_sequence(_tiny(recipe="permuted", num_tasks=2),
                          str(tmp_path / "w"), **arguments)
  assert not os.path.exists(str(tmp_path / "w"))


@pytest.mark.slow  # Two backbone SavedModel exports.
@pytest.mark.skipif(
    not os.path.isdir(sources.FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed (tools/test.sh "
    "installs it: apt-get install -y dataset-fashion-mnist)")
def test_a_keras_applications_backbone_learns_fashion_mnist(tmp_path):
  sequence = tasks.make_sequence("fashion_mnist", "split", "domain", 2)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:64], task.y_train[:64]
    task.x_test, task.y_test = task.x_test[:32], task.y_test[:32]
  results = training.run_sequence(
      sequence, str(tmp_path / "run"), model="MobileNetV3Small",
      weights="none", freeze_backbone=True, importance_samples=16, **_FAST)
  assert results["config"]["model"] == "MobileNetV3Small"
  served = tf.saved_model.load(str(tmp_path / "run" / "export" / "task_1"))
  logits = served.serve(tf.zeros((2, 28, 28, 1)))  # Raw 28×28 grey inputs.
  assert tuple(logits.shape) == (2, 5)
