"""apps/compare.py end to end on tiny data, and the selection protocol."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import comparison
from keras_mas import tasks


def test_validation_sequence_never_touches_test_data():
  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  validation = comparison.validation_sequence(sequence)
  for original, held in zip(sequence.tasks, validation.tasks):
    assert len(held.x_train) + len(held.x_test) == len(original.x_train)
    # Every sample, validation ones included, comes from the training set.
    pool = original.x_train.reshape(len(original.x_train), -1)
    for rows in (held.x_train, held.x_test):
      flat = rows.reshape(len(rows), -1)
      assert all((pool == r).all(axis=1).any() for r in flat[:20])


def test_compare_app_end_to_end(tmp_path):
  workdir = str(tmp_path / "compare")
  done = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "apps", "compare.py"),
       f"--workdir={workdir}", "--methods=finetune,mas,joint", "--seeds=2",
       "--num_tasks=2", "--epochs=1", "--hidden_units=8"],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("comparison.md", "comparison.csv", "acc_per_task.png",
               "accuracy_matrices.png", "choices.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "comparison.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["seed"]) for r in rows] == [
      ("finetune", "0"), ("finetune", "1"), ("mas", "0"), ("mas", "1"),
      ("joint", "0"), ("joint", "1")]
  with open(os.path.join(workdir, "choices.json")) as f:
    choices = json.load(f)
  grid = comparison.GRIDS["mas"][1]
  assert choices["mas"]["value"] in grid
  assert choices["mas"]["validation_acc"][f"{choices['mas']['value']:g}"] == (
      max(choices["mas"]["validation_acc"].values()))
  assert choices["finetune"] == {}
  with open(os.path.join(workdir, "comparison.md")) as f:
    table = f.read()
  assert "| mas | strength" in table and "±" in table
  assert os.listdir(os.path.join(workdir, "hparams"))
  acc = np.array([float(r["acc"]) for r in rows])
  assert np.all((acc >= 0) & (acc <= 1))


@pytest.mark.parametrize("flag, message", [
    ("--methods=mas,imm", "argument `methods`"),
    ("--learning_rate=-1", "argument `learning_rate`"),
    ("--seeds=0", "--seeds"),
])
def test_compare_app_bad_flags_fail_in_one_line(tmp_path, flag, message):
  done = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "apps", "compare.py"),
       f"--workdir={tmp_path / 'c'}", "--num_tasks=2", "--epochs=1", flag],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=300)
  assert done.returncode == 1
  assert "Traceback" not in done.stderr, done.stderr
  assert len([l for l in done.stderr.splitlines() if message in l]) == 1


def test_select_strength_for_the_users_own_model_and_tasks(tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  digits = tasks.make_sequence("digits", "split", "task", 2)
  own = tasks.from_arrays(
      [(t.x_train[:80], t.y_train[:80], t.x_test[:8], t.y_test[:8])
       for t in digits.tasks], scenario="task")
  for task in own.tasks:
    task.x_test = task.y_test = None  # Selection must never read them.
  model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(16, activation="relu"),
                            keras.layers.Dense(10)], name="users")
  choice = comparison.select_strength(
      own, str(tmp_path), method="mas", grid=(0.0, 100.0), model=model,
      epochs=1, batch_size=16)
  scores = choice["validation_acc"]
  assert choice["coefficient"] == "strength" and set(scores) == {"0", "100"}
  assert choice["value"] == max((0.0, 100.0),
                                key=lambda v: scores[f"{v:g}"])
  for value in ("0", "100"):
    with open(os.path.join(str(tmp_path), "mas", f"strength_{value}",
                           "results.json")) as f:
      trial = json.load(f)
    assert trial["config"]["strength"] == float(value)
    assert trial["config"]["model"] == "custom:users"
    assert trial["acc"] == scores[value]


def test_select_strength_refuses_methods_without_a_coefficient(tmp_path):
  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  with pytest.raises(ValueError, match="argument `method`"):
    comparison.select_strength(sequence, str(tmp_path), method="finetune")
  with pytest.raises(ValueError, match="argument `grid`"):
    comparison.select_strength(sequence, str(tmp_path), grid=())


def test_bad_method_is_named(tmp_path):
  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  with pytest.raises(ValueError, match="argument `methods`"):
    comparison.compare(sequence, str(tmp_path), ["mas", "imm"])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
