"""`ScalarMean` against `keras.metrics.Mean` on every backend.

Its fast path runs on PyTorch only (eager updates of one unweighted scalar);
everything else is Keras's own `Mean`. The script feeds both metrics the same
updates (scalars, weighted ones, vectors, a reset, nothing at all) and
reports each result, and on PyTorch whether the fast path served them.
"""

import importlib.util

import backend_processes
import numpy as np
import pytest

_CODE = """
import json
import keras, numpy as np
from keras_mas.core import scalar_mean

fast = []
mean, scalar = keras.metrics.Mean(), scalar_mean.ScalarMean(name="m")
if keras.backend.backend() == "torch":
  import torch
  original = keras.metrics.Mean.update_state
  def counting(self, *args, **kwargs):
    fast.append(False)
    return original(self, *args, **kwargs)
  keras.metrics.Mean.update_state = counting

def both(*args, **kwargs):
  for metric in (mean, scalar):
    metric.update_state(*args, **kwargs)

results = []
def record():
  results.append([float(keras.ops.convert_to_numpy(m.result()))
                  for m in (mean, scalar)])

record()  # nothing yet: 0
for value in (0.5, 1.5, -4.0):
  both(keras.ops.convert_to_tensor(value))
  record()
both(keras.ops.convert_to_tensor(2.0), sample_weight=3.0)
record()
both(keras.ops.convert_to_tensor(np.array([1.0, 2.0, 6.0], "float32")))
record()
both(7.0)  # a Python float
record()
for metric in (mean, scalar):
  metric.reset_state()
record()
both(keras.ops.convert_to_tensor(2.5))
record()
print(json.dumps({"results": results,
                  "slow_updates": len(fast), "name": scalar.name}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_scalar_mean_equals_keras_mean(backend):
  if backend != "tensorflow" and importlib.util.find_spec(backend) is None:
    pytest.skip(f"{backend} not installed")
  out = backend_processes.run(_CODE, backend)
  results = np.array(out["results"])
  np.testing.assert_allclose(results[:, 1], results[:, 0], rtol=1e-6)
  np.testing.assert_allclose(
      results[:, 0],
      [0, 0.5, 1.0, -2 / 3, (-2 + 6) / 6, (4 + 9) / 9, (13 + 7) / 10, 0,
       2.5], rtol=1e-6)
  assert out["name"] == "m"
  if backend == "torch":
    # Keras's path: `mean` every time; `scalar` for the weighted update,
    # the vector and the Python float only.
    assert out["slow_updates"] == 7 + 3
