r"""Learns a task sequence as one stream with no task boundaries (task-free).

  python apps/task_free.py --workdir=/tmp/task_free
  tensorboard --logdir=/tmp/task_free

The tasks become one stream of small batches; the learner is never told
where a task ends. Runs task-free MAS and its baselines on the same stream
and buffer size (online fine-tuning, experience replay, MAS at the true
boundaries), each as one `model.fit` over the stream, into
--workdir/<method>/ (results.json, online_accuracy.png, TensorBoard, a
checkpoint every --checkpoint_every batches, the final model as a SavedModel
in export/), and prints the table; --seeds=3 runs three seeds and prints
mean ± std (the task-free guide's table).
--resume continues an interrupted run. A bad flag stops the app before
training with one line naming it (exit status 1).
"""

import dataclasses
import json
import os

from absl import app
from absl import flags
from absl import logging

# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
# First: the log level, and a faster Keras import.
if __package__:  # Installed (keras_mas_apps), or `python -m apps.<app>`.
  from . import app_startup
else:  # Run as a file: its folder is first on sys.path.
  import app_startup
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
_TASK_SPEC = flags.DEFINE_string(
    "task_spec", None, "Python file defining task_spec() (see "
    "examples/task_spec.py): the tasks' TFRecords, streamed, never held "
    "whole; replaces --dataset/--recipe.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_EXPORT_CONSOLIDATIONS = flags.DEFINE_bool(
    "export_consolidations", False, "Also export a SavedModel at each "
    "consolidation (export_consolidations/step_N/).")
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
_STRENGTH = flags.DEFINE_float("strength", task_free.DEFAULT_STRENGTH,
                               "λ, the MAS penalty strength.")
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
_PEAK_QUANTILE = flags.DEFINE_float(
    "peak_quantile", task_free.DEFAULT_PEAK_QUANTILE,
    "A loss above this quantile of the plateau's losses is high ...")
_PEAK_MIN_HIGH = flags.DEFINE_integer(
    "peak_min_high", task_free.DEFAULT_PEAK_MIN_HIGH,
    "... and a peak has at least this many high losses in the window ...")
_PEAK_MIN_RELATIVE_RISE = flags.DEFINE_float(
    "peak_min_relative_rise", task_free.DEFAULT_PEAK_MIN_RELATIVE_RISE,
    "... and a window mean at least 1 + this times the plateau's mean.")
_PLATEAU_FALL_STDDEVS = flags.DEFINE_float(
    "plateau_fall_stddevs", task_free.DEFAULT_PLATEAU_FALL_STDDEVS,
    "A plateau's window mean fell from the previous window's by at most "
    "this many standard errors ...")
_PLATEAU_MIN_RELATIVE_DROP = flags.DEFINE_float(
    "plateau_min_relative_drop", task_free.DEFAULT_PLATEAU_MIN_RELATIVE_DROP,
    "... and lies this fraction below the highest window mean since the "
    "peak.")
_PEAK_STDDEVS = flags.DEFINE_float(
    "peak_stddevs", None, "Optional (the paper's rule): a peak also rises "
    "this many plateau standard deviations above its mean.")
_PEAK_MIN_RISE = flags.DEFINE_float(
    "peak_min_rise", None, "Optional absolute floor of a peak's rise, in "
    "loss units.")
_PLATEAU_MEAN = flags.DEFINE_float(
    "plateau_mean_below", None, "Optional absolute bound (the paper's "
    "rule): a plateau's window mean loss is below this.")
_PLATEAU_VARIANCE = flags.DEFINE_float(
    "plateau_variance_below", None, "Optional absolute bound: a plateau's "
    "window variance is below this.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds tasks, model and stream.")
_SEEDS = flags.DEFINE_integer(
    "seeds", 1, "Run seeds --seed .. --seed + N − 1 (each into "
    "--workdir/seed_<s>/<method>/ when N > 1) and print mean ± std.",
    lower_bound=1)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 50, "Checkpoint each method's stream every this many "
    "batches (0: never).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue an interrupted run in --workdir: finished "
    "methods are read back, the interrupted one resumes from its checkpoint.")


def _window():
  return task_free.LossWindow(
      window_size=_WINDOW_SIZE.value, peak_quantile=_PEAK_QUANTILE.value,
      peak_min_high=_PEAK_MIN_HIGH.value,
      peak_min_relative_rise=_PEAK_MIN_RELATIVE_RISE.value,
      plateau_fall_stddevs=_PLATEAU_FALL_STDDEVS.value,
      plateau_min_relative_drop=_PLATEAU_MIN_RELATIVE_DROP.value,
      peak_stddevs=_PEAK_STDDEVS.value, peak_min_rise=_PEAK_MIN_RISE.value,
      plateau_mean_below=_PLATEAU_MEAN.value,
      plateau_variance_below=_PLATEAU_VARIANCE.value)


def _sequence(seed):
  if _TASK_SPEC.value:
    return tasks.from_spec(_TASK_SPEC.value, scenario=_SCENARIO.value)
  return tasks.make_sequence(_DATASET.value, _RECIPE.value, _SCENARIO.value,
                             _NUM_TASKS.value, seed=seed,
                             data_dir=_DATA_DIR.value)


def _settings():
  """The run the flags give; each method and seed replace theirs."""
  return task_free.StreamRun(
      batch_size=_BATCH_SIZE.value, transition_steps=_TRANSITION_STEPS.value,
      buffer_size=_BUFFER_SIZE.value, strength=_STRENGTH.value,
      learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
      model=_MODEL.value, hidden_units=_HIDDEN_UNITS.value,
      updates_per_batch=_UPDATES.value, window=_window(),
      checkpoint_every=_CHECKPOINT_EVERY.value or None,
      export_consolidations=_EXPORT_CONSOLIDATIONS.value)


def _run_seed(settings, seed, workdir):
  """Every method on the stream of `seed`, each into workdir/<method>/."""
  sequence = _sequence(seed)
  results = []
  for method in _METHODS.value:
    method_dir = os.path.join(workdir, method)
    finished = os.path.join(method_dir, "results.json")
    if _RESUME.value and os.path.isfile(finished):
      with open(finished) as f:
        results.append(json.load(f))
      continue
    results.append(task_free.run_stream(
        sequence, dataclasses.replace(settings, method=method, seed=seed),
        workdir=method_dir, resume=_RESUME.value and os.path.isdir(
            os.path.join(method_dir, "checkpoint"))))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return sequence, results


def _main():
  logging.set_verbosity(logging.WARNING)
  bad = [m for m in _METHODS.value if m not in task_free.METHODS]
  if bad or not _METHODS.value:
    raise ValueError(
        f"Invalid value for flag --methods. Expected names from "
        f"{list(task_free.METHODS)}. Received: {_METHODS.value}")
  if _CHECKPOINT_EVERY.value < 0:
    raise ValueError(
        "Invalid value for flag --checkpoint_every. Expected an integer >= "
        f"0. Received: {_CHECKPOINT_EVERY.value}")
  settings = _settings()  # A bad flag stops the app here, before any data.
  seeds = range(_SEED.value, _SEED.value + _SEEDS.value)
  runs = []
  for seed in seeds:
    workdir = (_WORKDIR.value if _SEEDS.value == 1 else
               os.path.join(_WORKDIR.value, f"seed_{seed}"))
    os.makedirs(workdir, exist_ok=True)
    sequence, results = _run_seed(settings, seed, workdir)
    runs.append(results)
    print(f"{sequence.dataset} ({sequence.recipe}, {sequence.scenario}-"
          f"incremental), seed {seed}, one stream of "
          f"{results[0]['num_steps']} batches of {_BATCH_SIZE.value}:")
    print(task_free.format_results(results))
  if len(runs) > 1:
    summary = task_free.summarize_seeds(runs)
    with open(os.path.join(_WORKDIR.value, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    print(f"over seeds {seeds[0]}..{seeds[-1]}:")
    print(task_free.format_summary(summary))


main = cli.main_with_one_line_errors(_main)

def run():
  """The console script's entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
