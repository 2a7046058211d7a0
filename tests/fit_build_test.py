"""A `fit` after `compile` iterates its dataset once per epoch on every
backend: building the compiled loss and metrics draws no batch.

Keras's JAX and PyTorch `fit` build them from a batch drawn from the epoch
iterator, which starts one more iteration of the dataset: a dataset
reshuffled at each iteration (`pipelines.array_batches`) then trained on its
second order, not its first, after every `compile` but not after
`reset_optimizer`, so a resumed run (compiled afresh) left the uninterrupted
run's path. `MASModel` builds from the dataset's element spec instead.
"""

import importlib.util

import backend_processes
import pytest

_CODE = """
import json
import keras, numpy as np, tensorflow as tf
import keras_mas

iterations = []
x = np.random.RandomState(0).rand(40, 8).astype("float32")
y = (x.sum(1) > 4).astype("int32")

def batches():
  iterations.append(1)
  for i in range(0, 40, 16):
    yield x[i:i + 16], y[i:i + 16]

data = tf.data.Dataset.from_generator(batches, output_signature=(
    tf.TensorSpec((None, 8), tf.float32), tf.TensorSpec((None,), tf.int32)))
inputs = keras.Input((8,))
model = keras_mas.MASModel(inputs, keras.layers.Dense(2)(inputs))

def compile_():
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"])

compile_()
model.fit(data, epochs=2, verbose=0)
first = len(iterations)
model.consolidate(x, strength=1.0)
compile_()
model.fit(data, epochs=1, verbose=0)
print(json.dumps([first, len(iterations)]))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_fit_after_compile_iterates_once_per_epoch(backend):
  if backend != "tensorflow" and importlib.util.find_spec(backend) is None:
    pytest.skip(f"{backend} not installed")
  assert backend_processes.run(_CODE, backend) == [2, 3]
