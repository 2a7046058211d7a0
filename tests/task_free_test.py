"""Tests of keras_mas.task_free: task-free MAS in `model.fit`, run_stream, the app."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_mas import task_free
import tolerances



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
    tolerances.assert_all_close([o.numpy() for o in net.importances],
                                [e.numpy() for e in expected])
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
    stream = _stream([(0, 30), (1, 30)])

    def learner():
      return task_free.TaskFreeConsolidation(buffer_size=10,
                                             updates_per_batch=2)

    whole_net, whole = _model(), learner()
    task_free.fit_stream(whole_net, stream, whole)
    assert whole.consolidations  # Something to resume across.
    net, first = _model(), learner()
    task_free.fit_stream(net, stream, first, steps=37)
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
    task_free.fit_stream(resumed_net, stream.skip(37), resumed)
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
    # About one consolidation per hidden change (the bound: T − 1
    # to 3T), none before the first task is learned, at most one a stretch.
    starts = [0] + mas["boundaries"][:-1]
    assert len(sequence) - 1 <= len(mas["consolidations"]) <= 3 * len(
        sequence)
    assert mas["consolidations"][0] > 2 * 5  # Two windows at least.
    for start, stop in zip(starts, mas["boundaries"]):
      assert sum(start < c <= stop for c in mas["consolidations"]) <= 1
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

  def test_a_pipeline_stream_is_the_array_stream(self, tmp_path):
    # The same data as tf.data pipelines (as a task spec, TFRecords or
    # folders give them): streamed, never held whole, the same run.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from keras_mas import tasks  # pylint: disable=g-import-not-at-top
    arrays = tasks.make_sequence("digits", "split", "domain", 3)
    pipelines = tasks.from_datasets(
        [(tf.data.Dataset.from_tensor_slices((t.x_train, t.y_train)),
          tf.data.Dataset.from_tensor_slices((t.x_test, t.y_test)))
         for t in arrays.tasks],
        [t.num_classes for t in arrays.tasks], scenario="domain")
    assert pipelines.streaming
    streamed = task_free.run_stream(pipelines, "mas",
                                    workdir=str(tmp_path / "streamed"))
    held = task_free.run_stream(arrays, "mas")
    assert streamed["boundaries"] == held["boundaries"]
    assert streamed["consolidations"] == held["consolidations"]
    assert streamed["consolidations"]
    assert streamed["online_accuracy"] == held["online_accuracy"]
    np.testing.assert_allclose(streamed["accuracy_matrix"],
                               held["accuracy_matrix"], atol=1e-9)
    assert os.path.isdir(tmp_path / "streamed" / "export")

  def test_online_accuracy_and_exports_at_consolidations(self, tmp_path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from keras_mas import tasks  # pylint: disable=g-import-not-at-top
    sequence = tasks.make_sequence("digits", "split", "domain", 3)
    results = task_free.run_stream(sequence, "mas", workdir=str(tmp_path),
                                   export_consolidations=True,
                                   online_every=10)
    online = results["online"]
    steps = [r["step"] for r in online]
    assert steps == list(range(10, results["num_steps"], 10)) + [
        results["num_steps"]]
    # The tasks seen so far: a task counts once its stretch has begun.
    for record in online:
      begun = 1 + sum(b < record["step"] for b in results["boundaries"][:-1])
      assert record["tasks_seen"] == len(record["accuracies"]) == begun
      assert record["anytime_average_accuracy"] == pytest.approx(
          np.mean(record["accuracies"]))
      assert 0.0 <= record["prequential_accuracy"] <= 1.0
    # Digits' test sets are smaller than the 500 samples measured: at the
    # end, the anytime accuracies are the matrix's last row.
    np.testing.assert_allclose(online[-1]["accuracies"],
                               results["accuracy_matrix"][-1], atol=1e-9)
    # Prequential over all points, weighted by their batches: the whole
    # stream's online accuracy.
    assert (tmp_path / "online_accuracy.png").stat().st_size > 10_000
    assert {"stream/anytime_average_accuracy",
            "stream/prequential_accuracy"} <= _tags(tmp_path / "tensorboard")
    # A SavedModel at each consolidation, serving the model as it was then:
    # the last one is not the final model (training went on after it).
    exported = sorted(os.listdir(tmp_path / "export_consolidations"))
    assert exported == sorted(f"step_{s}" for s in results["consolidations"])
    x = tf.constant(sequence.tasks[0].x_test, "float32")
    outputs = [tf.saved_model.load(str(tmp_path / "export_consolidations" /
                                       name)).signatures["serve"](image=x)[
                                           "output_0"].numpy()
               for name in exported]
    final = tf.saved_model.load(str(tmp_path / "export")).signatures[
        "serve"](image=x)["output_0"].numpy()
    assert not np.allclose(outputs[-1], final)
    assert not np.allclose(outputs[0], outputs[-1])

  def test_seeds_summarize_as_mean_and_std(self):
    def run(method, acc, consolidations):
      return {"method": method, "acc": acc, "forgetting": 1 - acc,
              "online_accuracy": acc, "boundaries": [10, 20, 30],
              "consolidations": list(range(consolidations))}
    summary = task_free.summarize_seeds([[run("mas", 0.8, 2)],
                                         [run("mas", 0.6, 4)]])
    assert summary == [{
        "method": "mas", "seeds": 2, "hidden_changes": 2,
        "consolidations": [2, 4], "acc_mean": pytest.approx(0.7),
        "acc_std": pytest.approx(0.1), "forgetting_mean": pytest.approx(0.3),
        "forgetting_std": pytest.approx(0.1),
        "online_accuracy_mean": pytest.approx(0.7),
        "online_accuracy_std": pytest.approx(0.1)}]
    assert "| mas | 0.700 ± 0.100 |" in task_free.format_summary(summary)

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
    with pytest.raises(ValueError, match="strength=0.1 there, 2.0 here"):
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

  @pytest.mark.slow
  def test_seeds_print_the_readme_table(self, tmp_path):
    done = _app(f"--workdir={tmp_path}", "--num_tasks=2",
                "--methods=finetune,mas", "--seeds=2", "--checkpoint_every=0")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "summary.json") as f:
      summary = json.load(f)
    assert [row["method"] for row in summary] == ["finetune", "mas"]
    for seed in (0, 1):
      with open(tmp_path / f"seed_{seed}" / "mas" / "results.json") as f:
        assert json.load(f)["config"]["seed"] == seed
    assert summary[1]["consolidations"] == [
        len(json.load(open(tmp_path / f"seed_{seed}" / "mas" /
                           "results.json"))["consolidations"])
        for seed in (0, 1)]
    assert "| mas | " in done.stdout and "over seeds 0..1" in done.stdout

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
