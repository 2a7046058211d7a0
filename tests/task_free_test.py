"""Tests of keras_mas.task_free: task-free MAS in `model.fit`, run_stream, the app."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_mas import task_free



def _gaussian_task(task, n):
  """Two Gaussian blobs in 4×4 images, placed and oriented per task: the
  model of one task guesses the next one's labels at chance."""
  rng = np.random.default_rng(task)
  direction, offset = rng.standard_normal((2, 16))
  direction /= np.linalg.norm(direction)
  offset *= 3.0 / np.linalg.norm(offset)
  y = rng.integers(0, 2, n)
  x = (offset + np.where(y == 1, 1.5, -1.5)[:, None] * direction
       + 0.3 * rng.standard_normal((n, 16)))
  return x.reshape(n, 4, 4, 1).astype("float32"), y.astype("int64")


def _tags(log_dir):
  """Every summary tag written under `log_dir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in log_dir.iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(v.tag for v in event.summary.value)
  return tags


def _model(seed=0, metrics=("accuracy",), **compile_args):
  import keras  # pylint: disable=g-import-not-at-top
  from keras_mas import architectures  # pylint: disable=g-import-not-at-top
  net = architectures.build("mlp", (4, 4, 1), 2, hidden_units=16, seed=seed)
  net.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=list(metrics), **compile_args)
  return net


def _stream(stretches, batch=10):
  """A batched dataset of tasks one after another: `stretches` lists
  (task, batches)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parts = [_gaussian_task(task, count * batch) for task, count in stretches]
  x = np.concatenate([p[0] for p in parts])
  y = np.concatenate([p[1] for p in parts])
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


class TestFit:

  def test_consolidates_once_after_each_change(self, tmp_path):
    stretches = [(0, 30), (1, 30), (2, 60)]
    changes = np.cumsum([0] + [c for _, c in stretches])
    net = _model()
    learner = task_free.TaskFreeConsolidation(
        buffer_size=20, updates_per_batch=2, log_dir=str(tmp_path))
    history = net.fit(task_free.repeat_updates(_stream(stretches), 2),
                      callbacks=[learner], verbose=0,
                      shuffle=False)
    assert learner.step == changes[-1]
    # One consolidation in each stretch, after its start: none in the last
    # 60-batch stretch beyond the first.
    assert len(learner.consolidations) == 3
    for start, stop, step in zip(changes[:-1], changes[1:],
                                 learner.consolidations):
      assert start < step < stop
    assert net.consolidated_tasks == 3
    assert net.rehearsal is None  # Detached when fit ends.
    # fit's accuracy is the prequential one: each sample counted once.
    assert sum(n for _, n in learner.online_correct) == 10 * changes[-1]
    assert history.history["accuracy"][-1] == pytest.approx(
        learner.online_accuracy, abs=1e-6)
    assert 0.5 < learner.online_accuracy <= 1.0
    tags = _tags(tmp_path)
    assert any(t.startswith("importance/") for t in tags)
    assert "custom_scalars__config__" in tags  # The window's chart.
    assert {"stream/incoming_loss", "stream/window_mean", "stream/peaks",
            "stream/plateaus", "stream/consolidations",
            "stream/online_accuracy"} <= tags

  @pytest.mark.parametrize("metrics", [("accuracy",), ()])
  def test_prequential_accuracy_is_tested_before_training(self, metrics):
    # Counted by the buffer, and by fit's accuracy metric when compiled.
    net = _model(metrics=metrics)
    x, y = _gaussian_task(0, 20)
    before = np.argmax(net.predict(x[:10], verbose=0), axis=-1)
    learner = task_free.TaskFreeConsolidation(buffer_size=5,
                                              updates_per_batch=3)
    task_free.fit_stream(net, _stream([(0, 2)]), learner, steps=1)
    assert learner.online_correct == [(int(np.sum(before == y[:10])), 10)]

  def test_importance_on_the_buffer_is_mas_on_its_samples(self):
    from keras_mas import importance  # pylint: disable=g-import-not-at-top
    net = _model()
    learner = task_free.TaskFreeConsolidation(buffer_size=15,
                                              consolidate_at=[12])
    net.fit(_stream([(0, 12)]), callbacks=[learner], verbose=0,
            shuffle=False)
    assert learner.consolidations == [12]
    assert len(learner.buffer) == 15
    expected = importance.mas(net, learner.buffer.inputs)
    for omega, reference in zip(net.importances, expected):
      np.testing.assert_allclose(omega.numpy(), reference.numpy(), rtol=1e-5,
                                 atol=1e-7)
    for anchor, weight in zip(net.anchors, net.trainable_variables):
      np.testing.assert_array_equal(anchor.numpy(), weight.numpy())

  def test_finetune_and_replay_never_consolidate(self):
    for rehearse in (False, True):
      net = _model()
      learner = task_free.TaskFreeConsolidation(
          buffer_size=10, rehearse=rehearse, consolidate_at=None)
      task_free.fit_stream(net, _stream([(0, 8), (1, 8)]), learner)
      assert learner.consolidations == [] and net.consolidated_tasks == 0
      # The buffer is filled either way; only rehearsal trains on it.
      assert len(learner.buffer) == 10

  def test_resume_mid_stream_gives_the_same_run(self, tmp_path):
    import keras  # pylint: disable=g-import-not-at-top
    stream = _stream([(0, 15), (1, 15)])

    def learner():
      return task_free.TaskFreeConsolidation(buffer_size=10,
                                             updates_per_batch=2)

    whole_net, whole = _model(), learner()
    task_free.fit_stream(whole_net, stream, whole)
    assert whole.consolidations  # Something to resume across.
    net, first = _model(), learner()
    task_free.fit_stream(net, stream, first, steps=17)
    net.save(tmp_path / "model.keras")
    state = first.get_state()
    with open(tmp_path / "stream.json", "w") as f:
      json.dump(state["stream"], f)
    np.savez(tmp_path / "buffer.npz", **state["buffer"])
    # A new process would start here.
    resumed_net = keras.models.load_model(tmp_path / "model.keras")
    resumed = learner()
    with open(tmp_path / "stream.json") as f:
      resumed.set_state({"stream": json.load(f),
                         "buffer": dict(np.load(tmp_path / "buffer.npz"))})
    task_free.fit_stream(resumed_net, stream.skip(17), resumed)
    assert resumed.consolidations == whole.consolidations
    assert resumed.online_correct == whole.online_correct
    np.testing.assert_allclose(resumed.incoming_losses, whole.incoming_losses,
                               rtol=1e-5)
    np.testing.assert_array_equal(resumed.buffer.labels, whole.buffer.labels)
    for a, b in zip(resumed_net.weights, whole_net.weights):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

  def test_models_it_cannot_run_are_refused_at_the_start(self):
    import keras  # pylint: disable=g-import-not-at-top
    stream = _stream([(0, 2)])
    net = _model(steps_per_execution=2)
    weights = [w.numpy() for w in net.weights]
    with pytest.raises(ValueError, match="`steps_per_execution`"):
      net.fit(stream, callbacks=[task_free.TaskFreeConsolidation()],
              verbose=0, shuffle=False)
    for before, after in zip(weights, net.weights):
      np.testing.assert_array_equal(before, after.numpy())
    plain = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    plain.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="MASModel"):
      plain.fit(stream, callbacks=[task_free.TaskFreeConsolidation()],
                verbose=0, shuffle=False)

  def test_xla_is_turned_off_with_a_warning(self, monkeypatch):
    # Keras itself refuses XLA while op determinism is on, which another
    # test module turns on for the whole process.
    from tensorflow.python.framework import config  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(config, "is_op_determinism_enabled", lambda: False)
    net = _model(jit_compile=True)
    assert net.jit_compile
    learner = task_free.TaskFreeConsolidation(buffer_size=5)
    with pytest.warns(UserWarning, match="jit_compile"):
      net.fit(_stream([(0, 3)]), callbacks=[learner], verbose=0,
              shuffle=False)
    assert not net.jit_compile and learner.step == 3
    assert len(learner.buffer) == 5

  def test_bad_arguments_name_themselves(self):
    with pytest.raises(ValueError, match="`task_free`"):
      task_free.fit_stream(None, [], object())
    with pytest.raises(ValueError, match="`updates_per_batch`"):
      task_free.TaskFreeConsolidation(updates_per_batch=0)
    with pytest.raises(ValueError, match="`updates_per_batch`"):
      task_free.repeat_updates(_stream([(0, 1)]), 0)
    with pytest.raises(ValueError, match="`buffer_size`"):
      task_free.TaskFreeConsolidation(buffer_size=-3)
    with pytest.raises(ValueError, match="`consolidate_at`"):
      task_free.TaskFreeConsolidation(consolidate_at=[0, 3])
    with pytest.raises(ValueError, match="`consolidate_at`"):
      task_free.TaskFreeConsolidation(consolidate_at="peaks")
    with pytest.raises(ValueError, match="`window`"):
      task_free.TaskFreeConsolidation(window=5)
    with pytest.raises(ValueError, match="`accumulate`"):
      task_free.TaskFreeConsolidation(accumulate="mean")
    with pytest.raises(ValueError, match="strength"):
      task_free.TaskFreeConsolidation(strength=-1.0)


class TestRunStream:

  def test_task_free_mas_forgets_less_than_online_finetuning(self, tmp_path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from keras_mas import tasks  # pylint: disable=g-import-not-at-top
    sequence = tasks.make_sequence("digits", "split", "domain", 5)
    mas = task_free.run_stream(sequence, "mas", workdir=str(tmp_path))
    finetune = task_free.run_stream(sequence, "finetune")
    steps = mas["num_steps"]
    assert mas["boundaries"] == finetune["boundaries"]
    assert mas["boundaries"][-1] == steps
    assert mas["forgetting"] < finetune["forgetting"] - 0.05
    assert mas["acc"] > finetune["acc"]
    assert finetune["consolidations"] == []
    # One consolidation per task stretch, each within it: the detector
    # finds the hidden changes.
    starts = [0] + mas["boundaries"][:-1]
    assert len(mas["consolidations"]) == len(sequence)
    for start, stop, step in zip(starts, mas["boundaries"],
                                 mas["consolidations"]):
      assert start < step <= stop
    assert np.asarray(mas["accuracy_matrix"]).shape == (5, 5)
    assert 0.5 < mas["online_accuracy"] <= 1.0
    with open(tmp_path / "results.json") as f:
      assert json.load(f)["consolidations"] == mas["consolidations"]
    assert {"stream/window_mean", "stream/consolidations", "accuracy/task_0",
            "sequence/forgetting", "accuracy_matrix"} <= _tags(
                tmp_path / "tensorboard")
    table = task_free.format_results([mas, finetune])
    assert "mas" in table and "finetune" in table
    # The exported SavedModel serves the final model: its test accuracy is
    # the matrix's last row.
    served = tf.saved_model.load(str(tmp_path / "export"))
    for task, expected in zip(sequence.tasks, mas["accuracy_matrix"][-1]):
      logits = served.signatures["serve"](
          image=tf.constant(task.x_test, "float32"))["output_0"].numpy()
      predicted = task.start + np.argmax(logits[:, task.start:task.stop], -1)
      assert np.mean(predicted == task.y_test + task.label_offset
                     + task.start) == pytest.approx(expected, abs=1e-9)

  def test_bad_method_names_itself(self):
    from keras_mas import tasks  # pylint: disable=g-import-not-at-top
    sequence = tasks.make_sequence("digits", "split", "domain", 2)
    with pytest.raises(ValueError, match="`method`"):
      task_free.run_stream(sequence, "ewc")

  @pytest.mark.slow  # ~20 s: three runs of a two-task stream.
  def test_resume_after_a_crash_mid_stream_gives_the_same_results(
      self, tmp_path):
    import keras  # pylint: disable=g-import-not-at-top
    from keras_mas import tasks  # pylint: disable=g-import-not-at-top

    class Crash(keras.callbacks.Callback):

      def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == 3 * 35:  # Three train steps per incoming batch.
          raise RuntimeError("killed")

    sequence = tasks.make_sequence("digits", "split", "domain", 2)
    whole = task_free.run_stream(sequence, "mas")
    workdir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="killed"):
      task_free.run_stream(sequence, "mas", workdir=workdir,
                           checkpoint_every=10, callbacks=[Crash()])
    with pytest.raises(ValueError, match="`workdir`"):
      task_free.run_stream(sequence, "mas", workdir=workdir)
    with pytest.raises(ValueError, match="strength=1.0 there, 2.0 here"):
      task_free.run_stream(sequence, "mas", workdir=workdir, strength=2.0,
                           resume=True)
    resumed = task_free.run_stream(sequence, "mas", workdir=workdir,
                                   resume=True, checkpoint_every=10)
    for key in ("consolidations", "online_accuracy", "peaks", "plateaus"):
      assert resumed[key] == whole[key], key
    np.testing.assert_allclose(resumed["accuracy_matrix"],
                               whole["accuracy_matrix"], atol=1e-9)
    assert whole["consolidations"]  # The run has something to resume.


_APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "apps", "task_free.py")


def _app(*flags):
  return subprocess.run([sys.executable, _APP, *flags], capture_output=True,
                        text=True, timeout=600, check=False)


class TestApp:

  def test_bad_flag_is_one_line_and_nothing_is_written(self, tmp_path):
    # One process (~10 s of imports); the library's checks are tested above.
    done = _app(f"--workdir={tmp_path / 'run'}", "--buffer_size=0")
    assert done.returncode == 1
    errors = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "buffer_size" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "results.json")

  @pytest.mark.slow  # Two methods on a two-task stream, twice more: ~40 s.
  def test_runs_methods_on_one_stream(self, tmp_path):
    flags = (f"--workdir={tmp_path}", "--num_tasks=2",
             "--methods=finetune,mas", "--checkpoint_every=10")
    done = _app(*flags)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
      results = json.load(f)
    assert [r["method"] for r in results] == ["finetune", "mas"]
    assert results[0]["boundaries"] == results[1]["boundaries"]
    assert os.listdir(tmp_path / "mas" / "tensorboard")
    assert os.path.isdir(tmp_path / "mas" / "checkpoint")
    assert "mas " in done.stdout and "finetune " in done.stdout
    # Again without --resume: refused, one line; with it: read back.
    again = _app(*flags)
    assert again.returncode == 1 and "resume" in again.stderr
    resumed = _app(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(tmp_path / "results.json") as f:
      assert json.load(f) == results


def test_a_stop_request_checkpoints_the_stream_and_resume_finishes_it(
    tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  from keras_mas import tasks  # pylint: disable=g-import-not-at-top
  from keras_mas.experiments import preemption  # pylint: disable=g-import-not-at-top
  stop = preemption.StopRequest()

  class AskToStop(keras.callbacks.Callback):  # As SIGTERM's handler does.

    def on_train_batch_end(self, batch, logs=None):
      if batch + 1 == 3 * 35:  # Three train steps per incoming batch.
        stop.set("SIGTERM")

  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  whole = task_free.run_stream(sequence, "mas")
  workdir = str(tmp_path / "run")
  with pytest.raises(preemption.Preempted,
                     match="SIGTERM during task 0.*incoming batch 3[56]"):
    task_free.run_stream(sequence, "mas", workdir=workdir,
                         callbacks=[AskToStop()], stop=stop)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = task_free.run_stream(sequence, "mas", workdir=workdir,
                                 resume=True)
  for key in ("consolidations", "online_accuracy", "peaks", "plateaus"):
    assert resumed[key] == whole[key], key
  np.testing.assert_allclose(resumed["accuracy_matrix"],
                             whole["accuracy_matrix"], atol=1e-9)
