"""Test scripts on a given Keras backend, in a process kept for the next.

Keras fixes its backend at import, so the tests of the JAX and PyTorch
backends (and their TensorFlow references) run scripts in other processes.
Starting one costs 5–9 seconds of imports (TensorFlow, JAX or PyTorch,
Keras), most of such a test's time, so each test process keeps one worker
per backend (`tests/backend_worker.py`) and sends it the scripts in turn.
A script that needs an environment of its own (`extra_env`: flags read when
a library starts) runs in a new process; so does the next script after one
that killed or hung its worker.
"""

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_workers = {}


def _environment(backend, extra_env):
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
             **extra_env)
  env.pop("PYTHONPATH", None)  # keras_mas from the checkout (cwd) only.
  return env


class _Worker:
  """One `backend_worker.py` process and the answers it writes."""

  def __init__(self, backend):
    self._stderr = tempfile.TemporaryFile()
    self._process = subprocess.Popen(
        [sys.executable, os.path.join(_HERE, "backend_worker.py")],
        cwd=_ROOT, env=_environment(backend, {}), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True)
    self._answers = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self._process.stdout:
      self._answers.put(line)
    self._answers.put(None)

  def alive(self):
    return self._process.poll() is None

  def run(self, code, timeout):
    """`(answer, stderr)`: the worker's answer (None if it died or hung)
    and what it wrote to stderr meanwhile."""
    start = os.fstat(self._stderr.fileno()).st_size
    try:
      self._process.stdin.write(json.dumps({"code": code}) + "\n")
      self._process.stdin.flush()
      line = self._answers.get(timeout=timeout)
    except (BrokenPipeError, queue.Empty):
      line = None
    if line is None:
      self.close()
    end = os.fstat(self._stderr.fileno()).st_size
    stderr = os.pread(self._stderr.fileno(), end - start, start).decode(
        errors="replace")
    return (None if line is None else json.loads(line)), stderr

  def close(self):
    if self.alive():
      self._process.kill()
    self._process.wait()


@atexit.register
def _close_all():
  for worker in _workers.values():
    worker.close()


def run(code, backend, timeout=300, **extra_env):
  """Runs the script `code` with `KERAS_BACKEND=backend`.

  Returns:
    The last line the script printed, parsed as JSON.
  """
  if extra_env:
    done = subprocess.run([sys.executable, "-c", code], cwd=_ROOT,
                          env=_environment(backend, extra_env),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
  worker = _workers.get(backend)
  if worker is None or not worker.alive():
    worker = _workers[backend] = _Worker(backend)
  answer, stderr = worker.run(code, timeout)
  assert answer is not None, (
      f"the {backend} worker died or ran over {timeout} s:\n{stderr[-4000:]}")
  assert answer["ok"], f"{stderr[-2000:]}\n{answer['error'][-4000:]}"
  return json.loads(answer["stdout"].strip().splitlines()[-1])
