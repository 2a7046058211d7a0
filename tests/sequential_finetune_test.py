"""The app through its flags: a run, resume, and errors before training."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APP = os.path.join(_ROOT, "apps", "sequential_finetune.py")
_FAST = ["--num_tasks=2", "--epochs=1", "--hidden_units=16", "--verbose=0",
         "--recipe=split"]


def _run(*flags):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, _APP, *flags], capture_output=True,
                        text=True, env=env, timeout=300)


def test_app_runs_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", "--method=mas", "--strength=0.5",
              *_FAST)
  assert done.returncode == 0, done.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["method"] == "mas" and results["scenario"] == "domain"
  assert results["config"]["strength"] == 0.5
  assert results["extra"]["flags"]["strength"] == 0.5
  again = _run(f"--workdir={workdir}", "--method=mas", "--strength=0.5",
               "--resume", *_FAST, "--verbose=1")
  assert again.returncode == 0, again.stderr
  assert "Resuming after task 1" in again.stdout


@pytest.mark.parametrize("flag, message", [
    ("--method=magic", "--method"),
    ("--scenario=online", "--scenario"),
    ("--recipe=blurred", "--recipe"),
    ("--num_tasks=0", "--num_tasks"),
    ("--epochs=0", "--epochs"),
    ("--importance_samples=0", "--importance_samples"),
    ("--dataset=no_such_dataset_xyz", "argument `dataset`"),
    ("--num_tasks=9", "argument `num_tasks`"),
    ("--strength=-1", "argument `strength`"),
    ("--strength=nan", "argument `strength`"),
    ("--learning_rate=-1", "argument `learning_rate`"),
    ("--learning_rate=0", "argument `learning_rate`"),
    ("--optimizer=nope", "argument `optimizer`"),
    ("--model=resnet9000", "argument `model`"),
    ("--weights=/no/such/file.h5", "argument `weights`"),
])
def test_bad_flags_fail_before_training_in_one_line(tmp_path, flag,
                                                    message):
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", *_FAST, flag)
  assert done.returncode == 1
  assert "Traceback" not in done.stderr, done.stderr
  lines = [l for l in done.stderr.splitlines() if message in l]
  assert len(lines) == 1, done.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_app_trains_a_keras_applications_backbone(tmp_path):
  # Lower-case name, random weights, frozen: 8×8 grey digits are resized
  # and given three channels inside the model; the export takes them raw.
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", *_FAST, "--model=mobilenetv3small",
              "--weights=none", "--freeze_backbone", "--batch_size=64",
              "--importance_samples=32")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["config"]["model"] == "mobilenetv3small"
  assert results["config"]["freeze_backbone"] is True
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  served = tf.saved_model.load(os.path.join(workdir, "export", "task_1"))
  logits = served.serve(tf.zeros((3, 8, 8, 1)))
  assert tuple(logits.shape) == (3, 5)  # Two tasks of five digits.
  assert np.all(np.isfinite(logits.numpy()))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
