"""Runs apps/sequential_finetune.py and SIGKILLs itself at a chosen point.

Test helper for reliability_test.py. KERAS_MAS_TEST_CRASH_AT="<point>:<task>"
picks the point, counted from the start of a fresh run:
  fit          mid-epoch: the first batch end at or after the third batch of
               the task's first epoch (`steps_per_execution` > 1 reports
               only every k-th batch);
  consolidate  mid-consolidation: importance measured, not yet stored;
  checkpoint   mid-checkpoint-write: model.keras staged, state.json not;
  export       mid-export: the SavedModel staged, not renamed into place;
  in_task      mid-epoch, after the task's first checkpoint inside it;
  sigterm      the same moment, but a SIGTERM to itself instead (the app
               stops after the step under way and exits 75).
"""

import os
import runpy
import signal
import sys

from absl import app

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "apps"))  # As for the app's own file.

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
from keras_mas import callbacks
from keras_mas import checkpoints
from keras_mas import models

_POINT, _TASK = os.environ["KERAS_MAS_TEST_CRASH_AT"].split(":")
_TASK = int(_TASK)
_COUNTS = {"fit": -1, "consolidate": -1}


def _die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


if _POINT == "fit":
  original_begin = callbacks.DivergenceGuard.on_train_begin

  def on_train_begin(self, logs=None):
    _COUNTS["fit"] += 1
    if original_begin is not None:
      original_begin(self, logs)

  def on_train_batch_end(self, batch, logs=None):
    del self, logs
    if _COUNTS["fit"] == _TASK and batch >= 2:
      _die()

  callbacks.DivergenceGuard.on_train_begin = on_train_begin
  callbacks.DivergenceGuard.on_train_batch_end = on_train_batch_end
elif _POINT == "consolidate":
  measure = models.ESTIMATORS["mas"]

  def measure_then_die(*args, **kwargs):
    result = measure(*args, **kwargs)
    _COUNTS["consolidate"] += 1
    if _COUNTS["consolidate"] == _TASK:
      _die()
    return result

  models.ESTIMATORS["mas"] = measure_then_die
elif _POINT == "checkpoint":
  write_json = checkpoints.write_json

  def write_json_or_die(path, value):
    if f".task_{_TASK}.partial-" in path:
      _die()
    write_json(path, value)

  checkpoints.write_json = write_json_or_die
elif _POINT == "export":
  # ExportArchive() builds an instance of a backend-specific class.
  archive_class = type(keras.export.ExportArchive())
  write_out = archive_class.write_out

  def write_out_then_die(self, filepath, *args, **kwargs):
    write_out(self, filepath, *args, **kwargs)
    if f"task_{_TASK}.partial-" in str(filepath):
      _die()

  archive_class.write_out = write_out_then_die
elif _POINT in ("in_task", "sigterm"):
  write_in_task = checkpoints.write_in_task
  _STATE = {"written": False, "signalled": False}

  def write_in_task_and_arm(workdir, k, *args):
    write_in_task(workdir, k, *args)
    if k == _TASK:
      _STATE["written"] = True

  def on_train_batch_end(self, batch, logs=None):
    del self, logs
    if _STATE["written"] and batch >= 2 and not _STATE["signalled"]:
      if _POINT == "in_task":
        _die()
      _STATE["signalled"] = True
      os.kill(os.getpid(), signal.SIGTERM)

  checkpoints.write_in_task = write_in_task_and_arm
  callbacks.DivergenceGuard.on_train_batch_end = on_train_batch_end
else:
  raise ValueError(f"Unknown crash point {_POINT!r}")

if __name__ == "__main__":
  module = runpy.run_path(os.path.join(_ROOT, "apps",
                                       "sequential_finetune.py"))
  app.run(module["main"])
