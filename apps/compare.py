r"""Compares continual-learning methods × seeds on one task sequence.

  python apps/compare.py --workdir=/tmp/compare --scenario=domain

Chooses each method's coefficient on held-out training data (see
keras_mas.comparison), then writes comparison.md, comparison.csv, PNG plots
and TensorBoard HParams into --workdir.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import comparison
from keras_mas import tasks
from keras_mas import training

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_METHODS = flags.DEFINE_list(
    "methods", list(training.METHODS), "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (0..N-1).")
_DATASET = flags.DEFINE_string("dataset", "digits", "Dataset.")
_RECIPE = flags.DEFINE_enum("recipe", "split", list(tasks.RECIPES), "Recipe.")
_SCENARIO = flags.DEFINE_enum("scenario", "domain", list(tasks.SCENARIOS),
                              "Scenario.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 5, "Number of tasks.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs per task.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "Keras optimizer.")
_MODEL = flags.DEFINE_string("model", "mlp", "'mlp', 'cnn' or an app name.")
_HIDDEN_UNITS = flags.DEFINE_integer("hidden_units", 128, "Hidden width.")
_IMPORTANCE_SAMPLES = flags.DEFINE_integer(
    "importance_samples", None, "Samples per task for importance.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.experimental.enable_op_determinism()
  sequence = tasks.make_sequence(_DATASET.value, _RECIPE.value,
                                 _SCENARIO.value, _NUM_TASKS.value,
                                 data_dir=_DATA_DIR.value)
  comparison.compare(
      sequence, _WORKDIR.value, _METHODS.value,
      seeds=tuple(range(_SEEDS.value)),
      run_options={
          "epochs": _EPOCHS.value, "batch_size": _BATCH_SIZE.value,
          "learning_rate": _LEARNING_RATE.value,
          "optimizer": _OPTIMIZER.value, "model": _MODEL.value,
          "hidden_units": _HIDDEN_UNITS.value,
          "importance_samples": _IMPORTANCE_SAMPLES.value,
      })
  with open(os.path.join(_WORKDIR.value, "comparison.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
