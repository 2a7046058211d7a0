"""One run over several JAX processes: keras_mas.core.multi_process and the
app's --coordinator, --num_processes and --process_id.

The runs across processes are slow (`pytest -m slow -k processes`): two app
processes of 4 CPU devices each, on one mesh of 8, against one process of 8
devices; killed, they stop with one line, and `--resume` finishes the run.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import app_runner
from keras_mas.core import models
from keras_mas.core import multi_process

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="needs JAX (`pip install -e .[jax]`)")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS = ("--mesh=2,4", "--num_tasks=3", "--epochs=2", "--verbose=0")


class _Distribution:
  """What `local_part` reads of a Keras distribution."""

  def __init__(self, replicas, shard=0, auto_shard=True):
    self.num_model_replicas = replicas
    self.data_shard_id = shard
    self.auto_shard_dataset = auto_shard


@pytest.mark.parametrize("processes, process, replicas, shard, rows", [
    (2, 1, 2, 1, slice(4, 8)),   # One copy of the model per process.
    (2, 0, 4, 0, slice(0, 4)),   # Two copies per process.
    (2, 1, 1, 0, slice(0, 8)),   # One copy over both: the whole batch.
    (4, 3, 2, 1, slice(4, 8)),   # Two processes per copy.
])
def test_local_part_takes_the_rows_keras_gives_this_process(
    monkeypatch, processes, process, replicas, shard, rows):
  monkeypatch.setattr(multi_process, "count", lambda: processes)
  monkeypatch.setattr(multi_process, "index", lambda: process)
  monkeypatch.setattr(multi_process.keras.distribution, "distribution",
                      lambda: _Distribution(replicas, shard))
  x, y = np.arange(16).reshape(8, 2), np.arange(8)
  part = multi_process.local_part((x, y), 8)
  np.testing.assert_array_equal(part[0], x[rows])
  np.testing.assert_array_equal(part[1], y[rows])


def test_local_part_leaves_batches_alone_without_auto_sharding(monkeypatch):
  monkeypatch.setattr(multi_process, "count", lambda: 2)
  monkeypatch.setattr(multi_process.keras.distribution, "distribution",
                      lambda: _Distribution(2, auto_shard=False))
  x = np.arange(8)
  assert multi_process.local_part(x, 8) is x


def test_own_rows_feed_each_process_its_rows_of_every_batch(monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(multi_process, "count", lambda: 2)
  monkeypatch.setattr(multi_process, "index", lambda: 1)
  distribution = _Distribution(2, shard=1)
  monkeypatch.setattr(multi_process.keras.distribution, "distribution",
                      lambda: distribution)
  # Mapped after batching, with a smaller last batch: Keras's own sharding
  # reads no batch size from it, and would split the last one unevenly.
  batches = tf.data.Dataset.range(10).batch(4).map(lambda x: (x, -x))
  with multi_process.own_rows(batches) as own:
    assert not distribution.auto_shard_dataset  # Keras leaves them alone.
    rows = [x.numpy().tolist() for x, _ in own]
  assert distribution.auto_shard_dataset
  assert rows == [[2, 3], [6, 7], [9]]
  with multi_process.own_rows(batches.map(lambda x, y: x)) as own:
    assert [x.numpy().tolist() for x in own] == rows


def test_own_rows_leave_one_process_alone():
  data = object()
  with multi_process.own_rows(data) as own:
    assert own is data


def test_normalization_runs_the_same_sums_whatever_each_array_is(
    monkeypatch):
  # Across processes some entries are global arrays and some local (a
  # variable without measured importance): the computations must not
  # depend on which, nor the result differ from one process's.
  importances = [np.arange(4.0, dtype="float32").reshape(2, 2),
                 models.keras.ops.zeros((3,))]
  alone = models._normalized(importances, "mean")  # pylint: disable=protected-access
  monkeypatch.setattr(multi_process, "count", lambda: 2)
  shared = models._normalized(importances, "mean")  # pylint: disable=protected-access
  for a, b in zip(shared, alone):
    np.testing.assert_allclose(models.keras.ops.convert_to_numpy(a),
                               models.keras.ops.convert_to_numpy(b),
                               rtol=1e-6)


class _Device:

  def __init__(self, process_index):
    self.process_index = process_index


class _Sharding:
  """Pieces of a (8, 4) array: `pieces[d]` the rows device d holds; devices
  0-3 are process 0's, 4-7 process 1's."""

  def __init__(self, pieces):
    self.pieces = pieces

  def devices_indices_map(self, shape):
    return {_Device(d // 4): (slice(*rows), slice(0, shape[1]))
            for d, rows in enumerate(self.pieces)}


def test_an_array_is_gathered_only_where_a_process_lacks_pieces():
  # pylint: disable=protected-access
  quarters = [(i * 2, i * 2 + 2) for i in range(4)]
  held = multi_process._held_whole_by_each
  # Mesh rows are processes, the model axis inside each: all there.
  assert held(_Sharding(quarters * 2), (8, 4))
  assert held(_Sharding([(0, 8)] * 8), (8, 4))  # Replicated.
  # The model axis over both processes: each holds half.
  eighths = [(i, i + 1) for i in range(8)]
  assert not held(_Sharding(eighths), (8, 4))


_BAD = {
    "alone": (["--coordinator=localhost:1"], "argument `coordinator`",
              "jax"),
    "process": (["--coordinator=localhost:1", "--num_processes=2",
                 "--process_id=2", "--mesh=2,4"], "argument `process_id`",
                "jax"),
    "backend": (["--coordinator=localhost:1", "--num_processes=2",
                 "--mesh=2,4"], "argument `coordinator`", "tensorflow"),
}


@pytest.mark.parametrize("case", [
    pytest.param("alone", marks=pytest.mark.slow), "process",
    pytest.param("backend", marks=pytest.mark.slow)])
def test_bad_process_flags_are_named_before_training(case, tmp_path):
  flags, named, backend = _BAD[case]
  result = app_runner.run_finetune(tmp_path / "run", *flags, "--num_tasks=2",
                                   timeout=300, backend=backend)
  assert result.returncode == 1, (flags, result.stderr[-3000:])
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ValueError: Invalid value for argument")
  assert named in last, (flags, last)
  assert not (tmp_path / "run" / "checkpoints").exists()


def _free_port():
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _start(workdir, port, tmp, *flags):
  """Both processes of a run, each in a session of its own."""
  env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
             TMPDIR=str(tmp),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  script = os.path.join(_ROOT, "apps", "sequential_finetune.py")
  return [subprocess.Popen(
      [sys.executable, script, f"--workdir={workdir}", *_FLAGS, *flags,
       f"--coordinator=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
          for i in (0, 1)]


def _matrix(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["accuracy_matrix"]


@pytest.fixture(name="one_process", scope="module")
def _one_process(tmp_path_factory):
  """The run in one process over 8 devices."""
  workdir = tmp_path_factory.mktemp("one") / "run"
  env_flags = "--xla_force_host_platform_device_count=8"
  old = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = env_flags
  try:
    result = app_runner.run_finetune(workdir, *_FLAGS, backend="jax")
  finally:
    if old is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = old
  assert result.returncode == 0, result.stderr[-3000:]
  return _matrix(workdir)


@pytest.mark.slow
def test_two_processes_run_as_one_and_only_process_0_writes(one_process,
                                                              tmp_path):
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  processes = _start(tmp_path / "run", _free_port(), tmp)
  for p in processes:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  assert _matrix(tmp_path / "run") == one_process
  assert sorted(os.listdir(tmp_path / "run")) == [
      ".lock", "checkpoints", "export", "results.json", "tensorboard"]
  assert not os.listdir(tmp), "process 1's scratch folder was left"


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_and_resume_finishes(
    victim, one_process, tmp_path):
  workdir = tmp_path / "run"
  processes = _start(workdir, _free_port(), tmp_path)
  deadline = time.monotonic() + 600
  while not (workdir / "checkpoints" / "task_0").is_dir():
    assert time.monotonic() < deadline and processes[0].poll() is None
    time.sleep(0.2)
  os.killpg(processes[victim].pid, signal.SIGKILL)  # Its machine is gone.
  killed_at = time.monotonic()
  survivor = processes[1 - victim]
  _, err = survivor.communicate(timeout=300)
  waited = time.monotonic() - killed_at
  processes[victim].communicate()
  assert survivor.returncode == 75, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped: another process of this run stopped")
  assert "--resume" in last
  assert waited < 120, waited
  processes = _start(workdir, _free_port(), tmp_path, "--resume")
  for p in processes:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  assert _matrix(workdir) == one_process

