"""Checkpoints: atomic writes, the latest complete one, damaged ones refused."""

import json
import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_mas
from keras_mas import checkpoints


def _model():
  inputs = keras.Input((3,))
  return keras_mas.MASModel(inputs, keras.layers.Dense(2)(inputs))


def test_write_then_latest_and_load(tmp_path):
  workdir = str(tmp_path)
  assert checkpoints.latest(workdir) is None
  net = _model()
  for k in (0, 1):
    checkpoints.write(workdir, k, net, {"task": k})
  k, path = checkpoints.latest(workdir)
  assert (k, os.path.basename(path)) == (1, "task_1")
  assert checkpoints.read_json(os.path.join(path, "state.json")) == {
      "task": 1}
  loaded = checkpoints.load_model(path)
  for a, b in zip(loaded.weights, net.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Nothing half-written is left beside the checkpoints.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "task_0", "task_1"]


def test_incomplete_and_partial_checkpoints_are_skipped(tmp_path):
  workdir = str(tmp_path)
  checkpoints.write(workdir, 0, _model(), {})
  os.makedirs(os.path.join(workdir, "checkpoints", "task_3"))
  os.makedirs(os.path.join(workdir, "checkpoints", ".task_4.partial-9"))
  with pytest.warns(UserWarning, match="incomplete checkpoint"):
    assert checkpoints.latest(workdir)[0] == 0
  with pytest.warns(UserWarning, match="interrupted run"):
    checkpoints.remove_partial_writes(workdir)
  assert not os.path.exists(
      os.path.join(workdir, "checkpoints", ".task_4.partial-9"))


def test_damaged_state_and_model_are_refused_by_name(tmp_path):
  workdir = str(tmp_path)
  checkpoints.write(workdir, 0, _model(), {"config": {}})
  path = checkpoints.latest(workdir)[1]
  with pytest.raises(ValueError, match="state.json.*damaged"):
    checkpoints.read_state(path)
  with open(os.path.join(path, "model.keras"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(ValueError, match="model.keras.*fails to load"):
    checkpoints.load_model(path)


def test_write_json_replaces_whole(tmp_path):
  path = str(tmp_path / "r.json")
  checkpoints.write_json(path, {"a": 1})
  checkpoints.write_json(path, {"b": [1, 2]})
  with open(path) as f:
    assert json.load(f) == {"b": [1, 2]}
  assert os.listdir(str(tmp_path)) == ["r.json"]


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="argument `workdir`"):
    checkpoints.check_writable(str(blocker / "run"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from keras_mas.experiments import checkpoints
with checkpoints.workdir_lock({workdir!r}):
  print("held", flush=True)
  time.sleep(60)
"""


def test_one_run_per_workdir_and_a_killed_run_frees_it(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLD.format(root=root, workdir=workdir)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=(
        rf"argument `workdir`.*in use by process {holder.pid}")):
      with checkpoints.workdir_lock(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with checkpoints.workdir_lock(workdir):  # The OS released it.
    with open(os.path.join(workdir, ".lock")) as f:
      assert f.read() == str(os.getpid())


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path,
                                                                monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((3,))
  net = keras_mas.MASModel(inputs, keras.layers.Dense(2)(inputs))
  workdir = str(tmp_path / "run")
  state = {"config": {}, "accuracy_matrix": [], "baseline": [],
           "timings": []}
  checkpoints.write(workdir, 0, net, state)

  def full_disk(path, value):
    del path, value
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoints, "write_json", full_disk)
  for write in (lambda: checkpoints.write(workdir, 1, net, state),
                lambda: checkpoints.write_in_task(workdir, 1, 0, 0, net, state)):
    with pytest.raises(OSError, match=(
        r"Could not write the checkpoint .*task 1.*No space left on device"
        r".*written before are intact")):
      write()
  k, path = checkpoints.latest(workdir)
  assert k == 0 and checkpoints.load_model(path) is not None
  assert checkpoints.latest_in_task(workdir) is None
  assert not [e for e in os.listdir(os.path.join(workdir, "checkpoints"))
              if ".partial-" in e]
