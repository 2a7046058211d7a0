"""Checkpoints of a task sequence: one directory per completed task.

`checkpoints/task_<k>/` holds `model.keras` (weights, Ω, θ*, λ, the task
count) and `state.json` (configuration, accuracy matrix so far, timings).
`checkpoints/in_task/` holds the same inside the task under way, at an
epoch end (the optimizer's state included), with the task and the epoch. A
checkpoint is written beside its place and renamed into it whole, so an
interrupted run leaves either a complete checkpoint or a `.partial-` one that
is never loaded; `latest` and `latest_in_task` find where a resumed run
continues.
"""

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import warnings

import keras

from keras_mas.core import models
from keras_mas.core import multi_process

__all__ = ["check_config", "check_writable", "copy_model", "is_chief",
           "latest", "latest_in_task", "load_model", "read_json", "read_state",
           "remove_in_task", "remove_partial_writes", "replace_directory",
           "workdir_lock", "write", "write_dir", "write_in_task", "write_json"]

_CHECKPOINTS = "checkpoints"
_LOCK = ".lock"
_IN_TASK = "in_task"
_IN_TASK_KEPT = 2
_STATE = "state.json"
_MODEL = "model.keras"


def is_chief(strategy):
  """Whether this worker writes the run's files (always without a cluster):
  process 0 of a JAX run over several processes, or tf.distribute's chief."""
  if multi_process.count() > 1:
    return multi_process.index() == 0
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  return (task_type == "worker" and task_id == 0
          and "chief" not in resolver.cluster_spec().as_dict())


def write_dir(workdir, strategy=None):
  """Where this worker writes the run's files: `workdir` for the one that
  `is_chief`; for the others, which run the same code, a scratch folder
  (theirs to remove at the end)."""
  if is_chief(strategy):
    return workdir
  return tempfile.mkdtemp(prefix="keras_mas_worker_")


def check_writable(workdir):
  """Creates `workdir` if needed; raises ValueError if it is not writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(
        "Invalid value for argument `workdir`. Expected a writable "
        f"directory. Received: workdir={workdir!r} ({e.strerror})") from e


def latest(workdir):
  """`(k, path)` of the last complete checkpoint in `workdir`, or None."""
  root = os.path.join(workdir, _CHECKPOINTS)
  if not os.path.isdir(root):
    return None
  latest = None
  for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if entry.startswith(_IN_TASK) or entry.endswith(".old"):
      continue  # `latest_in_task`'s; an old one kept during a replace.
    if entry.startswith("task_") and entry[5:].isdigit():
      if not all(os.path.isfile(os.path.join(path, f))
                 for f in (_MODEL, _STATE)):
        warnings.warn(f"Ignoring incomplete checkpoint {path}.")
        continue
      k = int(entry[5:])
      if latest is None or k > latest[0]:
        latest = (k, path)
    else:
      warnings.warn(f"Ignoring partial checkpoint write {path}.")
  return latest


def remove_partial_writes(workdir):
  """Deletes what an interrupted run left half-written; it is never loaded."""
  for folder in (_CHECKPOINTS, "export"):
    root = os.path.join(workdir, folder)
    for entry in os.listdir(root) if os.path.isdir(root) else []:
      if ".partial-" in entry:
        warnings.warn(f"Removing partial write {os.path.join(root, entry)} "
                      "left by an interrupted run.")
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def read_state(path,
               keys=("config", "accuracy_matrix", "baseline", "timings")):
  """The `state.json` of checkpoint `path`; ValueError if damaged (any of
  `keys` missing)."""
  try:
    state = read_json(os.path.join(path, _STATE))
    missing = [k for k in keys if k not in state]
  except (OSError, ValueError, TypeError) as e:
    missing, state = [str(e)], None
  if missing:
    raise ValueError(
        "Invalid value for argument `resume`. Expected a readable checkpoint "
        f"state with {list(keys)}. Received: {os.path.join(path, _STATE)}, "
        f"which is damaged (missing or unreadable: {missing}). Nothing in the "
        "workdir was changed.")
  return state


def load_model(path):
  """The model of checkpoint `path`; ValueError if it does not load."""
  # Safe mode: a checkpoint never runs code (no lambdas, no pickles).
  try:
    return keras.models.load_model(os.path.join(path, _MODEL), safe_mode=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `resume`. Expected a loadable checkpoint. "
        f"Received: {os.path.join(path, _MODEL)}, which fails to load "
        f"({type(e).__name__}: {e}). Nothing in the workdir was changed."
    ) from e


def write(workdir, k, net, state):
  """Writes checkpoint `k` (model and state) into `workdir` atomically."""
  root = os.path.join(workdir, _CHECKPOINTS)
  os.makedirs(root, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".task_{k}.partial-", dir=root)
  with _staged(staging, f"the checkpoint of task {k}"):
    _save(net, os.path.join(staging, _MODEL))
    write_json(os.path.join(staging, _STATE), state)
  replace_directory(staging, os.path.join(root, f"task_{k}"))


def _save(net, path):
  """`net.save(path)`; across processes, every process gathers the weights
  that span processes (the others save into their scratch folder)."""
  with multi_process.whole_values(net):
    net.save(path)


@contextlib.contextmanager
def _staged(staging, what):
  """Removes `staging` if writing it fails, and says what was kept."""
  try:
    yield
  except OSError as e:
    shutil.rmtree(staging, ignore_errors=True)
    raise OSError(
        e.errno, f"Could not write {what} into {os.path.dirname(staging)} "
        f"({e.strerror or e}); the checkpoints written before are intact, "
        "and --resume continues from the last of them") from e


def replace_directory(staging, target):
  """Moves the complete directory `staging` to `target`.

  An existing `target` is renamed to `target.old` first and deleted only
  once the new one is in place: a crash in between leaves `target.old`,
  which readers fall back to.
  """
  old = None
  if os.path.isdir(target):
    old = target + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
  os.rename(staging, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def check_config(stored, config, where):
  """Raises, naming `resume`, unless the run in `where` had `config`."""
  stored = stored or {}
  if stored == config:
    return
  changed = sorted(key for key in set(config) | set(stored)
                   if stored.get(key) != config.get(key))
  raise ValueError(
      f"Invalid value for argument `resume`. The run in {where!r} was made "
      "with a different configuration; differing: "
      + ", ".join(f"{key}={stored.get(key)!r} there, {config.get(key)!r} "
                  "here" for key in changed))


def write_json(path, value):
  """Writes `value` to `path` as JSON, whole or not at all."""
  staging = f"{path}.partial-{os.getpid()}"
  with open(staging, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(staging, path)


def read_json(path):
  """The JSON value in `path`."""
  with open(path) as f:
    return json.load(f)


def copy_model(model, wrap=True):
  """A copy of `model` (weights and MAS state, not the object), through a
  `.keras` round trip.

  Args:
    model: the model to copy.
    wrap: return a `MASModel` (`MASModel.from_model` of the copy).
  """
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "copy.keras")
    _save(model, path)
    # The user handed this model over in memory: its code is trusted.
    copy = keras.models.load_model(path, compile=False, safe_mode=False)
  return models.MASModel.from_model(copy) if wrap else copy


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds `workdir` for one run: a second run on it is refused at once.

  An exclusive `flock` on `workdir/.lock`, which the OS releases when the
  process ends however it ends (a killed run never blocks its own resume).
  The file records the holder's process id for the error message.

  Raises:
    ValueError: naming `workdir`, if another run holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, _LOCK)
  # pylint: disable-next=consider-using-with
  handle = open(path, "a+", encoding="utf-8")
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise ValueError(
          "Invalid value for argument `workdir`. Expected a directory no "
          f"other run is using. Received: workdir={workdir!r}, in use by "
          f"process {holder}; wait for it, or choose another workdir") from e
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    yield
  finally:
    handle.close()  # Releases the lock.


def write_in_task(workdir, k, epoch, batch, net, state):
  """Writes a checkpoint inside task `k`, atomically.

  The run continues from batch `batch` of the task's epoch `epoch` (both
  counted from 0 within the task; batch 0: the epoch's start). The last
  `_IN_TASK_KEPT` checkpoints are kept: should the newest be unreadable, a
  resume falls back to the one before.
  """
  root = os.path.join(workdir, _CHECKPOINTS)
  os.makedirs(root, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{_IN_TASK}.partial-", dir=root)
  with _staged(staging, f"the checkpoint inside task {k}"):
    _save(net, os.path.join(staging, _MODEL))
    write_json(os.path.join(staging, _STATE),
               {**state, "task": int(k), "epoch": int(epoch),
                "batch": int(batch)})
  paths = _in_task_paths(workdir)
  shutil.rmtree(paths[-1], ignore_errors=True)
  for older, newer in zip(paths[::-1], paths[-2::-1]):
    if os.path.isdir(newer):
      os.rename(newer, older)
  os.rename(staging, paths[0])


def _in_task_paths(workdir):
  """The checkpoints inside a task, newest first."""
  root = os.path.join(workdir, _CHECKPOINTS, _IN_TASK)
  return [root] + [f"{root}.{i}" for i in range(1, _IN_TASK_KEPT)]


def latest_in_task(workdir):
  """`(k, epoch, batch, path)` of the newest readable checkpoint inside a
  task, or None."""
  for path in _in_task_paths(workdir):
    if not all(os.path.isfile(os.path.join(path, f))
               for f in (_MODEL, _STATE)):
      continue
    try:
      state = read_state(path, keys=("config", "task", "epoch", "batch"))
      return (int(state["task"]), int(state["epoch"]), int(state["batch"]),
              path)
    except (ValueError, KeyError, TypeError):
      warnings.warn(f"Ignoring unreadable checkpoint {path}.")
  return None


def remove_in_task(workdir):
  """Deletes the checkpoints inside a task, once the task's own is written."""
  for path in _in_task_paths(workdir):
    shutil.rmtree(path, ignore_errors=True)
