"""keras_mas under tf.distribute: mirrored replicas and two local workers.

Each case runs in fresh processes (tests/distribute_helper.py, or the app):
logical CPU devices and collective ops must be configured before TensorFlow
starts. Worker processes talk over loopback ports only, are bounded in time
and killed on the way out.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HELPER = os.path.join(_ROOT, "tests", "distribute_helper.py")
_APP = os.path.join(_ROOT, "apps", "sequential_finetune.py")
_TIMEOUT = 240
_APP_FLAGS = ["--recipe=split", "--num_tasks=2", "--epochs=1",
              "--hidden_units=16", "--batch_size=16", "--verbose=0"]


def _env(**extra):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def _free_ports(count):
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]


def _tf_config(ports, index):
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
      "task": {"type": "worker", "index": index},
  })


def _run_workers(commands_for, **env_vars):
  """Starts one process per worker, waits for all, kills all on the way out."""
  ports = _free_ports(2)
  processes = []
  try:
    for i in range(2):
      processes.append(subprocess.Popen(
          commands_for(i),
          env=_env(TF_CONFIG=_tf_config(ports, i), **env_vars),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=_TIMEOUT) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]


def _check(report):
  assert report["replicas"] == 2
  assert report["importance"] < 1e-5
  assert report["penalty"] < 1e-4
  assert report["weights"] < 1e-4
  assert report["anchors"] < 1e-4
  assert report["restore_on_one_device"] == 0.0
  assert report["restore_under_strategy"] == 0.0


def test_mirrored_over_two_logical_cpus(tmp_path):
  out = str(tmp_path / "mirrored.json")
  done = subprocess.run([sys.executable, _HELPER, "mirrored", out],
                        env=_env(), capture_output=True, text=True,
                        timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out) as f:
    _check(json.load(f))


def test_multi_worker_over_two_local_processes(tmp_path):
  outs = [str(tmp_path / f"worker_{i}.json") for i in range(2)]
  _run_workers(lambda i: [sys.executable, _HELPER, "multi_worker", outs[i]])
  for out in outs:
    with open(out) as f:
      _check(json.load(f))


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single") / "run")
  done = subprocess.run([sys.executable, _APP, f"--workdir={workdir}",
                         *_APP_FLAGS], env=_env(), capture_output=True,
                        text=True, timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  return _results(workdir)


def test_app_mirrored_matches_one_device(single_device_run, tmp_path):
  workdir = str(tmp_path / "run")
  done = subprocess.run(
      [sys.executable, _APP, f"--workdir={workdir}", *_APP_FLAGS,
       "--distribution=mirrored", "--virtual_cpus=2"],
      env=_env(), capture_output=True, text=True, timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(_results(workdir)["accuracy_matrix"],
                             single_device_run["accuracy_matrix"], atol=0.02)


def test_app_multi_worker_matches_one_device(single_device_run, tmp_path):
  workdir = str(tmp_path / "run")
  _run_workers(lambda i: [sys.executable, _APP, f"--workdir={workdir}",
                          *_APP_FLAGS, "--distribution=multi_worker"])
  results = _results(workdir)  # written by the chief alone
  np.testing.assert_allclose(results["accuracy_matrix"],
                             single_device_run["accuracy_matrix"], atol=0.05)
  assert sorted(os.listdir(workdir)) == [  # .lock: the chief's run lock.
      ".lock", "checkpoints", "export", "results.json", "tensorboard"]


@pytest.fixture(scope="module")
def task_spec_records(tmp_path_factory):
  records = str(tmp_path_factory.mktemp("records"))
  done = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "examples", "write_records.py"),
       records], env=_env(), capture_output=True, text=True, timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  return records


_SPEC_FLAGS = [f"--task_spec={os.path.join(_ROOT, 'examples', 'task_spec.py')}",
               "--scenario=task", "--method=lwf", "--epochs=2",
               "--hidden_units=16", "--batch_size=16", "--verbose=0"]


_SHARDED = """
import json, sys
import numpy as np
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
from keras_mas import pipelines
x = np.arange(64, dtype="float32")[:, None]
batches = pipelines.training_batches(
    tf.data.Dataset.from_tensor_slices((x, np.zeros(64, "int64"))), 16, 1)
seen = []
for batch in strategy.experimental_distribute_dataset(batches):
  for local in strategy.experimental_local_results(batch[0]):
    seen += local.numpy().ravel().tolist()
with open(sys.argv[1], "w") as f:
  json.dump(seen, f)
"""


def test_training_pipelines_are_sharded_across_two_workers(tmp_path):
  outs = [str(tmp_path / f"seen_{i}.json") for i in range(2)]
  _run_workers(lambda i: [sys.executable, "-c", _SHARDED, outs[i]],
               PYTHONPATH=_ROOT)
  seen = []
  for out in outs:
    with open(out) as f:
      seen.append(json.load(f))
  # Each worker reads its own half of every epoch: together, each sample
  # once.
  assert len(seen[0]) == len(seen[1]) == 32
  assert sorted(seen[0] + seen[1]) == list(range(64))


# sequential_finetune_test streams the same task spec on one device.
@pytest.mark.slow
def test_streamed_tfrecord_tasks_train_on_two_workers(task_spec_records,
                                                      tmp_path):
  # TFRecord pipelines, with LwF's frozen copy applied in them, under
  # MultiWorkerMirroredStrategy (sharding itself: the test above).
  workdir = str(tmp_path / "workers")
  _run_workers(lambda i: [sys.executable, _APP, f"--workdir={workdir}",
                          *_SPEC_FLAGS, "--distribution=multi_worker"],
               KERAS_MAS_RECORDS=task_spec_records)
  results = _results(workdir)
  assert results["tasks"] == ["a", "b"]
  matrix = np.array(results["accuracy_matrix"])
  assert matrix[0, 0] > 0.5 and matrix[1, 1] > 0.4  # 5 classes: chance 0.2


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
