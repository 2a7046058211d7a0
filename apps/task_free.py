r"""Learns a task sequence as one stream with no task boundaries (task-free).

  python apps/task_free.py --workdir=/tmp/task_free
  tensorboard --logdir=/tmp/task_free

The tasks become one stream of small batches; the learner is never told
where a task ends. Runs task-free MAS and its baselines on the same stream
and buffer size (online fine-tuning, experience replay, MAS at the true
boundaries), each as one `model.fit` over the stream, into
--workdir/<method>/ (results.json, TensorBoard, a checkpoint every
--checkpoint_every batches, the final model as a SavedModel in export/),
and prints the table.
--resume continues an interrupted run. A bad flag stops the app before
training with one line naming it (exit status 1).
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from apps import app_startup  # First: log level, a faster Keras import.
from keras_mas import task_free
from keras_mas.data import tasks
from keras_mas.experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_DATASET = flags.DEFINE_string("dataset", "digits", "A source name (see "
                               "keras_mas.data.sources); 'digits' is bundled.")
_RECIPE = flags.DEFINE_enum("recipe", "split", list(tasks.RECIPES),
                            "How tasks are made from the dataset.")
_SCENARIO = flags.DEFINE_enum("scenario", "domain", ["domain", "class"],
                              "domain- or class-incremental (a task-free "
                              "learner never knows a task id).")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 5, "Number of tasks.")
_METHODS = flags.DEFINE_list(
    "methods", list(task_free.METHODS),
    f"Which of {list(task_free.METHODS)} to run, on the same stream.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 10,
                                   "Samples per incoming batch.")
_TRANSITION_STEPS = flags.DEFINE_integer(
    "transition_steps", 0, "Blur each task change over this many batches.")
_BUFFER_SIZE = flags.DEFINE_integer("buffer_size",
                                    task_free.DEFAULT_BUFFER_SIZE,
                                    "Samples in the hard buffer.")
_STRENGTH = flags.DEFINE_float("strength", 1.0, "λ, the MAS penalty strength.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "A Keras optimizer.")
_UPDATES = flags.DEFINE_integer("updates_per_batch", 3,
                                "Train steps on each incoming batch.")
_MODEL = flags.DEFINE_string("model", "mlp", "'mlp', 'cnn' or a "
                             "keras.applications name.")
_HIDDEN_UNITS = flags.DEFINE_integer("hidden_units", 128, "Hidden width.")
_WINDOW_SIZE = flags.DEFINE_integer("window_size",
                                    task_free.DEFAULT_WINDOW_SIZE,
                                    "Losses in the sliding window.")
_PLATEAU_MEAN = flags.DEFINE_float(
    "plateau_mean_below", task_free.DEFAULT_PLATEAU_MEAN_BELOW,
    "A plateau's window mean loss is below this.")
_PLATEAU_VARIANCE = flags.DEFINE_float(
    "plateau_variance_below", task_free.DEFAULT_PLATEAU_VARIANCE_BELOW,
    "A plateau's window variance is below this.")
_PEAK_STDDEVS = flags.DEFINE_float(
    "peak_stddevs", task_free.DEFAULT_PEAK_STDDEVS,
    "A peak rises this many plateau standard deviations above it ...")
_PEAK_MIN_RISE = flags.DEFINE_float(
    "peak_min_rise", task_free.DEFAULT_PEAK_MIN_RISE,
    "... and at least this much.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds tasks, model and stream.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 50, "Checkpoint each method's stream every this many "
    "batches (0: never).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue an interrupted run in --workdir: finished "
    "methods are read back, the interrupted one resumes from its checkpoint.")


def _main():
  logging.set_verbosity(logging.WARNING)
  bad = [m for m in _METHODS.value if m not in task_free.METHODS]
  if bad or not _METHODS.value:
    raise ValueError(
        f"Invalid value for flag --methods. Expected names from "
        f"{list(task_free.METHODS)}. Received: {_METHODS.value}")
  window = task_free.LossWindow(
      window_size=_WINDOW_SIZE.value,
      plateau_mean_below=_PLATEAU_MEAN.value,
      plateau_variance_below=_PLATEAU_VARIANCE.value,
      peak_stddevs=_PEAK_STDDEVS.value, peak_min_rise=_PEAK_MIN_RISE.value)
  sequence = tasks.make_sequence(_DATASET.value, _RECIPE.value,
                                 _SCENARIO.value, _NUM_TASKS.value,
                                 seed=_SEED.value)
  if _CHECKPOINT_EVERY.value < 0:
    raise ValueError(
        "Invalid value for flag --checkpoint_every. Expected an integer >= "
        f"0. Received: {_CHECKPOINT_EVERY.value}")
  results = []
  for method in _METHODS.value:
    workdir = os.path.join(_WORKDIR.value, method)
    finished = os.path.join(workdir, "results.json")
    if _RESUME.value and os.path.isfile(finished):
      with open(finished) as f:
        results.append(json.load(f))
      continue
    results.append(task_free.run_stream(
        sequence, method, workdir=workdir,
        checkpoint_every=_CHECKPOINT_EVERY.value or None,
        resume=_RESUME.value and os.path.isdir(
            os.path.join(workdir, "checkpoint")),
        batch_size=_BATCH_SIZE.value,
        transition_steps=_TRANSITION_STEPS.value,
        buffer_size=_BUFFER_SIZE.value, strength=_STRENGTH.value,
        learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
        model=_MODEL.value, hidden_units=_HIDDEN_UNITS.value,
        updates_per_batch=_UPDATES.value, window=window, seed=_SEED.value))
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"{sequence.dataset} ({sequence.recipe}, {sequence.scenario}-"
        f"incremental), one stream of {results[0]['num_steps']} batches of "
        f"{_BATCH_SIZE.value}:")
  print(task_free.format_results(results))


main = cli.main_with_one_line_errors(_main)

if __name__ == "__main__":
  app.run(main)
