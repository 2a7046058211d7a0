"""Runs keras_mas under a tf.distribute strategy and compares with one device.

Test helper for distribute_test.py, run in its own process because logical
devices and collective ops must be set up before TensorFlow starts:

  distribute_helper.py mirrored OUT.json
  TF_CONFIG=... distribute_helper.py multi_worker OUT.json

Writes the largest relative differences it measured into OUT.json.
"""

import json
import os
import sys
import tempfile

import tensorflow as tf

_MODE, _OUT = sys.argv[1], sys.argv[2]
if _MODE == "mirrored":
  _CPU = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      _CPU, [tf.config.LogicalDeviceConfiguration()] * 2)
  STRATEGY = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
else:
  STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import numpy as np

import keras_mas
from keras_mas import importance

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(64, 6)).astype("float32")
_Y = _RNG.integers(0, 3, size=64)


def _model(conv=False):
  keras.utils.set_random_seed(0)
  if conv:
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(3, 2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)  # vectorized per-sample path
    x = keras.layers.Flatten()(x)
  else:
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu")(inputs)
  return keras_mas.MASModel(inputs, keras.layers.Dense(3)(x))


def _compile(model):
  model.compile(keras.optimizers.SGD(0.05),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def _relative(a, b):
  a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _worst(pairs):
  return max(_relative(a, b) for a, b in pairs)


def main():
  report = {"replicas": STRATEGY.num_replicas_in_sync}
  with STRATEGY.scope():
    distributed, distributed_conv = _model(), _model(conv=True)
  single, single_conv = _model(), _model(conv=True)
  x_conv = _X[:, :4].reshape(-1, 2, 2, 1).repeat(2, 1).repeat(2, 2)
  report["importance"] = max(
      _worst(zip([o.numpy() for o in importance.mas(distributed, _X[:61],
                                                    batch_size=8)],
                 [o.numpy() for o in importance.mas(single, _X[:61],
                                                    batch_size=8)])),
      _worst(zip([o.numpy() for o in importance.local_mas(
          distributed, _X, batch_size=16)], [o.numpy() for o in
                                             importance.local_mas(single, _X,
                                                                  batch_size=16)])),
      _worst(zip([o.numpy() for o in importance.mas(
          distributed_conv, x_conv, batch_size=16)],
                 [o.numpy() for o in importance.mas(single_conv, x_conv,
                                                    batch_size=16)])),
  )

  # Two tasks: fit, consolidate, fit with the penalty.
  with STRATEGY.scope():
    _compile(distributed)
  _compile(single)
  for model in (distributed, single):
    model.fit(_X, _Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    model.consolidate(_X, strength=3.0)
    model.fit(_X + 1, (_Y + 1) % 3, batch_size=16, epochs=2, shuffle=False,
              verbose=0)
  report["penalty"] = _relative(float(distributed.mas_penalty()),
                                float(single.mas_penalty()))
  report["weights"] = _worst(zip(
      [v.numpy() for v in distributed.trainable_variables],
      [v.numpy() for v in single.trainable_variables]))
  report["anchors"] = _worst(zip(
      [v.numpy() for v in distributed.importances + distributed.anchors],
      [v.numpy() for v in single.importances + single.anchors]))

  # Checkpoints move between a strategy and one device, both ways.
  folder = tempfile.mkdtemp()
  distributed.save(os.path.join(folder, "distributed.keras"))
  single.save(os.path.join(folder, "single.keras"))
  on_one_device = keras.models.load_model(
      os.path.join(folder, "distributed.keras"))
  with STRATEGY.scope():
    on_replicas = keras.models.load_model(os.path.join(folder, "single.keras"))
  report["restore_on_one_device"] = _worst(zip(
      [v.numpy() for v in on_one_device.weights],
      [v.numpy() for v in distributed.weights]))
  report["restore_under_strategy"] = max(
      _worst(zip([v.numpy() for v in on_replicas.weights],
                 [v.numpy() for v in single.weights])),
      _relative(float(on_replicas.mas_penalty()), float(single.mas_penalty())))
  with open(_OUT, "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  main()
