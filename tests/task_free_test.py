"""Tests of keras_mas.task_free: detector, hard buffer, stream learning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_mas import task_free


def _drifting_losses(change_points, length, seed=0, noise=0.03):
  """Loss of a learner meeting new data at `change_points`: a jump to ~2,
  then an exponential decay to ~0.05, with noise."""
  rng = np.random.default_rng(seed)
  losses = []
  starts = list(change_points) + [length]
  for start, stop in zip(starts[:-1], starts[1:]):
    t = np.arange(stop - start)
    losses.extend(0.05 + 2.0 * np.exp(-t / 6.0)
                  + noise * rng.standard_normal(len(t)))
  return np.maximum(np.array(losses), 0.0)


class TestLossWindow:

  def test_one_plateau_after_each_change_none_while_stationary(self):
    change_points = [0, 120, 300]
    window = task_free.LossWindow()
    events = [window.update(v) for v in _drifting_losses(change_points, 600)]
    plateaus = [s + 1 for s, e in enumerate(events) if e == "plateau"]
    peaks = [s + 1 for s, e in enumerate(events) if e == "peak"]
    assert window.plateaus == plateaus
    # One plateau per stretch, shortly after its change point, none in the
    # 300 stationary steps that follow the last one.
    assert len(plateaus) == 3
    for start, plateau in zip(change_points, plateaus):
      assert start < plateau < start + 40
    # A peak within a window's length of each hidden change.
    assert len(peaks) == 2
    for start, peak in zip(change_points[1:], peaks):
      assert start < peak <= start + window.window_size
    assert window.peaks == [0] + peaks

  def test_no_plateau_without_learning(self):
    window = task_free.LossWindow()
    rng = np.random.default_rng(1)
    events = [window.update(v) for v in 1.5 + 0.1 * rng.standard_normal(200)]
    assert "plateau" not in events

  def test_noise_on_a_plateau_is_not_a_peak(self):
    window = task_free.LossWindow()
    rng = np.random.default_rng(2)
    losses = np.abs(0.05 + 0.05 * rng.standard_normal(500))
    events = [window.update(v) for v in losses]
    assert events.count("plateau") == 1
    assert "peak" not in events

  def test_thresholds_mean_what_they_say(self):
    window = task_free.LossWindow(window_size=3, plateau_mean_below=0.5,
                                  plateau_variance_below=0.01,
                                  peak_stddevs=1.0, peak_min_rise=0.1)
    assert [window.update(v) for v in (0.4, 0.4)] == [None, None]
    assert window.update(0.4) == "plateau"
    assert window.mean == pytest.approx(0.4)
    assert window.peak_level == pytest.approx(0.5)
    assert window.update(0.69) is None  # Mean 0.4967: not above 0.5.
    assert window.update(0.70) == "peak"
    # Mean below 0.5 but variance above 0.01: not settled.
    assert window.update(0.1) is None
    assert [window.update(v) for v in (0.1, 0.1)] == [None, "plateau"]

  def test_state_round_trip_continues_identically(self):
    losses = _drifting_losses([0, 50, 110], 200, seed=3)
    whole = task_free.LossWindow()
    expected = [whole.update(v) for v in losses]
    first = task_free.LossWindow()
    for v in losses[:77]:
      first.update(v)
    state = json.loads(json.dumps(first.get_state()))  # Plain values.
    resumed = task_free.LossWindow()
    resumed.set_state(state)
    assert [resumed.update(v) for v in losses[77:]] == expected[77:]
    assert resumed.get_state() == whole.get_state()

  @pytest.mark.parametrize("kwargs", [
      {"window_size": 0}, {"window_size": 2.5}, {"plateau_mean_below": -1},
      {"plateau_variance_below": float("nan")}, {"peak_stddevs": "x"},
      {"peak_min_rise": float("inf")}])
  def test_bad_arguments_name_themselves(self, kwargs):
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
      task_free.LossWindow(**kwargs)

  def test_bad_loss_and_state_change_nothing(self):
    window = task_free.LossWindow(window_size=2)
    window.update(1.0)
    before = window.get_state()
    with pytest.raises(ValueError, match="`loss`"):
      window.update(float("nan"))
    with pytest.raises(ValueError, match="`state`"):
      window.set_state({"losses": [1.0, 2.0, 3.0]})
    assert window.get_state() == before


class TestHardBuffer:

  def test_keeps_the_highest_losses_newest_first_on_ties(self):
    buffer = task_free.HardBuffer(3)
    x, y = buffer.with_batch(np.arange(4.0)[:, None], np.arange(4))
    assert x.shape == (4, 1)  # Empty buffer: the batch alone.
    buffer.update(x, y, [0.1, 0.9, 0.5, 0.7])
    np.testing.assert_array_equal(buffer.labels, [1, 3, 2])
    x, y = buffer.with_batch(np.array([[10.0], [11.0]]), np.array([10, 11]))
    np.testing.assert_array_equal(y, [10, 11, 1, 3, 2])
    # The buffer's losses are measured again with the batch's.
    buffer.update(x, y, [0.3, 0.6, 0.2, 0.6, 0.8])
    np.testing.assert_array_equal(buffer.labels, [2, 11, 3])
    np.testing.assert_array_equal(buffer.inputs[:, 0], [2.0, 11.0, 3.0])
    assert len(buffer) == 3

  def test_state_round_trip(self, tmp_path):
    buffer = task_free.HardBuffer(2)
    buffer.update(np.ones((3, 2, 2, 1)), np.array([0, 1, 2]), [1.0, 3.0, 2.0])
    np.savez(tmp_path / "buffer.npz", **buffer.get_state())
    restored = task_free.HardBuffer(2)
    restored.set_state(dict(np.load(tmp_path / "buffer.npz")))
    for key, value in buffer.get_state().items():
      np.testing.assert_array_equal(restored.get_state()[key], value)
    empty = task_free.HardBuffer(2)
    empty.set_state(task_free.HardBuffer(2).get_state())
    assert len(empty) == 0

  def test_bad_input_changes_nothing(self):
    buffer = task_free.HardBuffer(2)
    buffer.update(np.zeros((2, 1)), np.array([0, 1]), [1.0, 2.0])
    with pytest.raises(ValueError, match="`losses`"):
      buffer.update(np.zeros((2, 1)), np.array([0, 1]), [1.0])
    with pytest.raises(ValueError, match="`losses`"):
      buffer.update(np.zeros((2, 1)), np.array([0, 1]), [1.0, np.nan])
    with pytest.raises(ValueError, match="`state`"):
      buffer.set_state({"inputs": np.zeros((3, 1)), "labels": np.zeros(3),
                        "losses": np.zeros(3)})
    with pytest.raises(ValueError, match="`capacity`"):
      task_free.HardBuffer(0)
    np.testing.assert_array_equal(buffer.labels, [1, 0])


# --------------------------------------------------------------------------
# Learning a stream with a real model.


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


def _model(seed=0):
  import keras  # pylint: disable=g-import-not-at-top
  from keras_mas import architectures  # pylint: disable=g-import-not-at-top
  net = architectures.build("mlp", (4, 4, 1), 2, hidden_units=16, seed=seed)
  net.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return net


def _stream(stretches, batch=10):
  """Batches of tasks one after another: `stretches` lists (task, batches)."""
  batches = []
  for task, count in stretches:
    x, y = _gaussian_task(task, count * batch)
    batches += [(x[i:i + batch], y[i:i + batch])
                for i in range(0, len(x), batch)]
  return batches


class TestFitStream:

  def test_consolidates_once_after_each_change(self, tmp_path):
    stretches = [(0, 30), (1, 30), (2, 60)]
    changes = np.cumsum([0] + [c for _, c in stretches])
    net = _model()
    learner = task_free.TaskFreeConsolidation(
        buffer_size=20, log_dir=str(tmp_path))
    task_free.fit_stream(net, _stream(stretches), learner,
                         updates_per_batch=2)
    assert learner.step == changes[-1]
    # One consolidation in each stretch, after its start: none in the last
    # 60-batch stretch beyond the first.
    assert len(learner.consolidations) == 3
    for start, stop, step in zip(changes[:-1], changes[1:],
                                 learner.consolidations):
      assert start < step < stop
    assert net.consolidated_tasks == 3
    assert 0.5 < learner.online_accuracy <= 1.0
    tags = _tags(tmp_path)
    assert any(t.startswith("importance/") for t in tags)
    assert {"stream/incoming_loss", "stream/window_mean", "stream/peak",
            "stream/plateau", "stream/consolidation",
            "stream/online_accuracy"} <= tags

  def test_importance_on_the_buffer_is_mas_on_its_samples(self):
    from keras_mas import importance  # pylint: disable=g-import-not-at-top
    net = _model()
    batches = _stream([(0, 12)])
    learner = task_free.TaskFreeConsolidation(buffer_size=15,
                                              consolidate_at=[12])
    task_free.fit_stream(net, batches, learner)
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
    batches = _stream([(0, 15), (1, 15)])

    def learner():
      return task_free.TaskFreeConsolidation(buffer_size=10)

    whole_net, whole = _model(), learner()
    task_free.fit_stream(whole_net, batches, whole)
    net, first = _model(), learner()
    task_free.fit_stream(net, batches, first, steps=17)
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
    task_free.fit_stream(resumed_net, batches[17:], resumed)
    assert resumed.consolidations == whole.consolidations
    assert resumed.online_correct == whole.online_correct
    for a, b in zip(resumed_net.weights, whole_net.weights):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

  def test_bad_arguments_name_themselves(self):
    with pytest.raises(ValueError, match="`task_free`"):
      task_free.fit_stream(None, [], object())
    with pytest.raises(ValueError, match="`updates_per_batch`"):
      task_free.fit_stream(None, [], task_free.TaskFreeConsolidation(),
                           updates_per_batch=0)
    with pytest.raises(ValueError, match="`consolidate_at`"):
      task_free.TaskFreeConsolidation(consolidate_at=[0, 3])
    with pytest.raises(ValueError, match="`window`"):
      task_free.TaskFreeConsolidation(window=5)
    with pytest.raises(ValueError, match="`accumulate`"):
      task_free.TaskFreeConsolidation(accumulate="mean")
    with pytest.raises(ValueError, match="strength"):
      task_free.TaskFreeConsolidation(strength=-1.0)


class TestRunStream:

  def test_task_free_mas_forgets_less_than_online_finetuning(self, tmp_path):
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
    assert {"stream/window_mean", "stream/consolidation", "accuracy/task_0",
            "sequence/forgetting", "accuracy_matrix"} <= _tags(
                tmp_path / "tensorboard")
    table = task_free.format_results([mas, finetune])
    assert "mas" in table and "finetune" in table

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
        if batch + 1 == 35:
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
