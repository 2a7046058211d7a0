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
    ("--dataset=no_such_dataset_xyz", "argument `dataset`"),
    ("--num_tasks=9", "argument `num_tasks`"),
    ("--strength=-1", "argument `strength`"),
    ("--optimizer=nope", "argument `optimizer`"),
])
def test_bad_flags_fail_before_training(tmp_path, flag, message):
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", *_FAST, flag)
  assert done.returncode != 0
  assert message in done.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
