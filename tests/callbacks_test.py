"""TensorBoard logging of keras_mas.callbacks, read back as TensorBoard does."""

import glob
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_mas
from keras_mas import callbacks


def _tensors(logdir, tag):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  (events,) = glob.glob(os.path.join(logdir, "events.*"))
  accumulator = event_accumulator.EventAccumulator(events, size_guidance={
      event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return [(e.step, tf.make_ndarray(e.tensor_proto))
          for e in accumulator.Tensors(tag)]


def test_importance_histograms_follow_omega_at_each_step(tmp_path):
  model = keras_mas.MASModel.from_model(keras.Sequential(
      [keras.Input((3,)), keras.layers.Dense(4, name="dense")], name="net"))
  x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
  writer = tf.summary.create_file_writer(str(tmp_path))
  largest = []
  for step in range(2):
    model.consolidate(x * (step + 1))  # Ω accumulates, and grows.
    callbacks.log_importance(writer, model, step=step)
    largest.append(float(tf.reduce_max(model._mas.importances[0])))
  writer.close()
  logged = _tensors(str(tmp_path), "importance/net/dense/kernel")
  assert [step for step, _ in logged] == [0, 1]
  for (_, buckets), top in zip(logged, largest):
    # Histogram buckets: (left edge, right edge, count).
    assert buckets[:, 2].sum() == 12  # every entry of the 3×4 kernel
    assert buckets[:, 1].max() == pytest.approx(top, rel=1e-5)
  assert largest[1] > largest[0]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
