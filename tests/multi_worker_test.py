"""multi_worker: Keras 3.15's fit under MultiWorkerMirroredStrategy."""

import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
from keras_mas import multi_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_logs_are_unchanged_under_other_strategies():
  logs = {"loss": tf.constant(2.0)}
  for strategy in (None, tf.distribute.get_strategy()):
    assert multi_worker.replica_logs(strategy, logs) is logs
  assert not multi_worker.is_multi_worker(None)


def test_logs_get_an_axis_and_a_mas_model_trains_under_the_strategy():
  # In a process of its own: collective ops are set up once per process.
  # One worker does not show the build failure; two workers training are
  # in distribute_test.
  code = textwrap.dedent("""
      import keras, numpy as np, tensorflow as tf
      import keras_mas
      from keras_mas import multi_worker

      strategy = tf.distribute.MultiWorkerMirroredStrategy()
      logs = multi_worker.replica_logs(strategy, {"loss": tf.constant(1.0)})
      assert logs["loss"].shape == (1,), logs

      class Net(keras_mas.MASModel):
        def __init__(self, **kwargs):
          super().__init__(**kwargs)
          self.dense = keras.layers.Dense(3)
        def call(self, inputs):
          return self.dense(inputs)

      rng = np.random.default_rng(0)
      x = rng.normal(size=(64, 4)).astype("float32")
      y = rng.integers(0, 3, 64)
      with strategy.scope():
        model = Net()  # Built by `fit`, from one local share of a batch.
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
      history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
      assert model.built and len(model.importances) == 2
      assert np.all(np.isfinite(history.history["loss"])), history.history
      print("ok")
  """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("TF_CONFIG", None)
  result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout.strip().endswith("ok")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
