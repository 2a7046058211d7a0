"""configs: one typed object per runner, checked when made, recorded,
compared on resume; the runners take it or its fields as keywords alike."""

import dataclasses
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas.data import tasks
from keras_mas.experiments import configs
from keras_mas.experiments import sequential
from keras_mas.experiments import streaming
from keras_mas.task_free import loss_window


def _tiny(num_tasks=2):
  sequence = tasks.make_sequence("digits", "split", "domain", num_tasks)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:48], task.y_train[:48]
    task.x_test, task.y_test = task.x_test[:24], task.y_test[:24]
  return sequence


@pytest.mark.parametrize("kwargs,argument", [
    ({"method": "nope"}, "method"),
    ({"strength": -1.0}, "strength"),
    ({"penalty_mode": "both"}, "penalty_mode"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"optimizer": "no_such_optimizer"}, "optimizer"),
    ({"model": "no_such_net"}, "model"),
    ({"weights": "/no/such/file.h5"}, "weights`/`freeze_backbone"),
    ({"importance_samples": 0}, "importance_samples"),
    ({"alpha": 1.5}, "alpha"),
    ({"fisher": "observed"}, "fisher"),
    ({"temperature": 0}, "temperature"),
    ({"batch_norm": "freeze"}, "batch_norm"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"normalize_importance": "median"}, "normalize_importance"),
    ({"checkpoint_seconds": -1}, "checkpoint_seconds"),
    ({"checkpoint_steps": 0}, "checkpoint_steps"),
])
def test_a_bad_sequence_setting_is_named_when_the_run_is_made(kwargs,
                                                              argument):
  with pytest.raises(ValueError, match=f"argument `{argument}`") as raised:
    configs.SequenceRun(**kwargs)
  assert "Received" in str(raised.value)


@pytest.mark.parametrize("kwargs,argument", [
    ({"method": "ewc"}, "method"),
    ({"batch_size": 0}, "batch_size"),
    ({"transition_steps": -1}, "transition_steps"),
    ({"buffer_size": 0}, "buffer_size"),
    ({"updates_per_batch": 0}, "updates_per_batch"),
    ({"window": {"window_size": 5}}, "window"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"online_every": -3}, "online_every"),
    ({"learning_rate": 0}, "learning_rate"),
])
def test_a_bad_stream_setting_is_named_when_the_run_is_made(kwargs, argument):
  with pytest.raises(ValueError, match=f"argument `{argument}`"):
    configs.StreamRun(**kwargs)


def test_recorded_settings_are_plain_json_without_timing_options():
  run = configs.SequenceRun(epochs=3, weights="none", checkpoint_seconds=5)
  recorded = run.recorded()
  assert recorded["epochs"] == 3 and recorded["weights"] is None
  assert "checkpoint_seconds" not in recorded
  # Unset options stay absent, as runs recorded them before they existed.
  assert "lora_rank" not in recorded
  assert "normalize_importance" not in recorded
  assert configs.SequenceRun(normalize_importance="mean").recorded()[
      "normalize_importance"] == "mean"
  assert json.loads(json.dumps(recorded)) == recorded
  stream = configs.StreamRun(window=loss_window.LossWindow(window_size=7))
  assert stream.recorded()["window"]["window_size"] == 7
  assert json.loads(json.dumps(stream.recorded())) == stream.recorded()


def test_settings_are_frozen_and_replaced_through_their_checks():
  run = configs.SequenceRun()
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.epochs = 3
  with pytest.raises(ValueError, match="argument `epochs`"):
    dataclasses.replace(run, epochs=-1)


def test_a_run_object_and_keyword_settings_give_the_same_run(tmp_path):
  sequence = _tiny()
  fast = {"epochs": 1, "batch_size": 16, "hidden_units": 16}
  by_object = sequential.run_sequence(
      sequence, str(tmp_path / "object"), configs.SequenceRun(**fast),
      verbose=0)
  by_keywords = sequential.run_sequence(sequence, str(tmp_path / "keywords"),
                                        verbose=0, **fast)
  assert by_object["accuracy_matrix"] == by_keywords["accuracy_matrix"]
  assert by_object["config"] == by_keywords["config"]
  assert by_object["config"] == {
      "dataset": "digits", "recipe": "split", "scenario": "domain",
      "num_tasks": 2, "importance_data": None,
      **configs.SequenceRun(**fast).recorded()}


def test_resume_names_every_setting_that_differs(tmp_path):
  sequence = _tiny()
  run = configs.SequenceRun(epochs=1, batch_size=16, hidden_units=16)
  workdir = str(tmp_path)
  sequential.run_sequence(sequence, workdir, run, verbose=0)
  # A timing option may change on resume; a setting may not.
  sequential.run_sequence(sequence, workdir, run, resume=True, verbose=0,
                          checkpoint_seconds=0)
  with pytest.raises(ValueError, match="argument `resume`") as raised:
    sequential.run_sequence(sequence, workdir, run, resume=True, verbose=0,
                            strength=1.0, seed=3)
  assert "seed=0 there, 3 here" in str(raised.value)
  assert "strength=0.1 there, 1.0 here" in str(raised.value)


def test_run_stream_takes_a_stream_run_or_a_method_name():
  sequence = _tiny()
  run = configs.StreamRun(method="replay", batch_size=16, hidden_units=16,
                          buffer_size=20)
  by_object = streaming.run_stream(sequence, run)
  by_name = streaming.run_stream(sequence, "replay", batch_size=16,
                                 hidden_units=16, buffer_size=20)
  assert by_object["config"] == by_name["config"] == run.recorded()
  assert by_object["accuracy_matrix"] == by_name["accuracy_matrix"]
  # The run's window is a setting, not the stream's state: untouched.
  assert run.window.peaks == loss_window.LossWindow().peaks


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
