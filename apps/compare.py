r"""Compares continual-learning methods × seeds on one task sequence.

  python apps/compare.py --workdir=/tmp/compare --scenario=domain

Chooses each method's coefficient on held-out training data (see
keras_mas.experiments.comparison), then writes comparison.md, comparison.csv, PNG plots
and TensorBoard HParams into --workdir. A bad flag stops the app before
training with one line naming it (exit status 1).
"""

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
from keras_mas.data import tasks
from keras_mas.experiments import cli
from keras_mas.experiments import comparison
from keras_mas.experiments import sequential as training

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_METHODS = flags.DEFINE_list(
    "methods", list(training.METHODS), "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (0..N-1).",
                               lower_bound=1)
_DATASET = flags.DEFINE_string(
    "dataset", "digits", "'digits', 'fashion_mnist' (offline when Debian's "
    "dataset-fashion-mnist is installed), 'idx:DIR' or a TFDS name.")
_RECIPE = flags.DEFINE_enum("recipe", "split", list(tasks.RECIPES), "Recipe.")
_SCENARIO = flags.DEFINE_enum("scenario", "domain", list(tasks.SCENARIOS),
                              "Scenario.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 5, "Number of tasks.",
                                   lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per task.",
                                lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.",
                                    lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3,
                                    "Learning rate, > 0.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "Keras optimizer.")
_MODEL = flags.DEFINE_string(
    "model", "mlp", "'mlp', 'cnn' or a keras.applications name (any case).")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Local weights file for a keras.applications backbone; "
    "'none' or unset: random initialisation.")
_FREEZE_BACKBONE = flags.DEFINE_bool(
    "freeze_backbone", False, "Keep a keras.applications backbone fixed.")
_HIDDEN_UNITS = flags.DEFINE_integer("hidden_units", 128, "Hidden width.",
                                     lower_bound=1)
_IMPORTANCE_SAMPLES = flags.DEFINE_integer(
    "importance_samples", None, "Samples per task for importance.",
    lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_TFDS_SPLITS = flags.DEFINE_list(
    "tfds_splits", None, "TRAIN,TEST split names of a TFDS --dataset in "
    "TFDS's syntax, e.g. 'train[:20%],test' (default: train,test).")


def _main():
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.enable_op_determinism()
  sequence = tasks.make_sequence(_DATASET.value, _RECIPE.value,
                                 _SCENARIO.value, _NUM_TASKS.value,
                                 data_dir=_DATA_DIR.value,
                                 splits=_TFDS_SPLITS.value)
  comparison.compare(
      sequence, _WORKDIR.value, _METHODS.value,
      seeds=tuple(range(_SEEDS.value)),
      run_options={
          "epochs": _EPOCHS.value, "batch_size": _BATCH_SIZE.value,
          "learning_rate": _LEARNING_RATE.value,
          "optimizer": _OPTIMIZER.value, "model": _MODEL.value,
          "hidden_units": _HIDDEN_UNITS.value, "weights": _WEIGHTS.value,
          "freeze_backbone": _FREEZE_BACKBONE.value,
          "importance_samples": _IMPORTANCE_SAMPLES.value,
      })
  with open(os.path.join(_WORKDIR.value, "comparison.md")) as f:
    print(f.read())


main = cli.main_with_one_line_errors(_main)

def run():
  """The console script's entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
