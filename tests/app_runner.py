"""Runs apps/sequential_finetune.py in a subprocess, as a user does, or
under tests/crash_app.py, which kills or stops it at a chosen point."""

import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_finetune(workdir, *flags, crash_at=None, timeout=900, backend=None):
  """The app's `CompletedProcess` (output captured, never raising).

  Args:
    workdir: its `--workdir`.
    *flags: its other flags.
    crash_at: `KERAS_MAS_TEST_CRASH_AT` for crash_app.py (e.g.
      `"sigterm:0"`), or None for the app itself.
    timeout: seconds.
    backend: `KERAS_BACKEND` for the run (default: as this process's).
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if backend:
    env["KERAS_BACKEND"] = backend
  script = os.path.join(_ROOT, "apps", "sequential_finetune.py")
  if crash_at:
    env["KERAS_MAS_TEST_CRASH_AT"] = crash_at
    script = os.path.join(_ROOT, "tests", "crash_app.py")
  return subprocess.run(
      [sys.executable, script, f"--workdir={workdir}", *flags], env=env,
      capture_output=True, text=True, timeout=timeout, check=False)
