"""Closed forms of per-sample importance on JAX and PyTorch.

`keras_mas.importance._closed_forms` differentiates each convolution,
embedding, dense and normalization layer alone, from the `δ` of one batched
pass; every result must equal the definition, the mapped (`vmap(grad)`)
per-sample gradients of the whole model, computed in the same process with
the closed forms switched off. Keras fixes its backend at import, so each
backend runs in another process, as in `backends_test`.
"""

import importlib.util
import textwrap

import backend_processes
import pytest
import tolerances


def _installed(backend, module):
  return pytest.param(backend, marks=pytest.mark.skipif(
      importlib.util.find_spec(module) is None,
      reason=f"{module} is not installed: pip install -e .[{backend}]"))


@pytest.fixture(params=[_installed("jax", "jax"),
                        _installed("torch", "torch")])
def backend(request):
  return request.param


# Small models whose trainable weights NumPy draws; `measure` gives MAS and
# empirical Fisher with the closed forms, and with the mapped gradients of
# the whole model (the reference).
_PRELUDE = """
import json, os
import numpy as np
import keras
import keras_mas
from keras_mas.importance import _closed_forms, _functional
assert keras.backend.backend() == os.environ["KERAS_BACKEND"]

def set_weights(model, seed=0, scale=0.4):
  rng = np.random.default_rng(seed)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))
  return model

def arrays(result):
  return [np.asarray(keras.ops.convert_to_numpy(t)).tolist() for t in result]

def units_of(model):
  units, rest = _closed_forms.split(model, model.trainable_variables)
  return sorted(type(u.layer).__name__ for u in units), len(rest)

def measure(build, x, y=None, **options):
  # Batches of one size: one trace per step.
  def both():
    model = build()
    result = {"mas": arrays(keras_mas.importance.mas(
        model, x, batch_size=8, **options))}
    if y is not None:
      result["fisher"] = arrays(keras_mas.importance.fisher(
          model, (x, y), batch_size=8, **options))
    return result
  closed = both()
  saved = _closed_forms.CLOSED_FORM_UNITS, _functional.dense_units
  _closed_forms.CLOSED_FORM_UNITS = ()
  _functional.dense_units = lambda model, variables: None
  try:
    mapped = both()
  finally:
    _closed_forms.CLOSED_FORM_UNITS, _functional.dense_units = saved
  return {"closed": closed, "mapped": mapped, "units": units_of(build())}

rng = np.random.default_rng(1)
labels = rng.integers(0, 3, 16)
"""


def _run(code, backend):
  return backend_processes.run(_PRELUDE + textwrap.dedent(code), backend,
                               timeout=600)


def _assert_equal_to_mapped(result):
  for key in result["closed"]:
    tolerances.assert_all_close(result["closed"][key], result["mapped"][key])
    assert all(sum(map(abs, _flat(a))) > 0 for a in result["closed"][key])


def _flat(values):
  if isinstance(values, list):
    return [v for item in values for v in _flat(item)]
  return [values]


def test_convolutions_equal_the_mapped_gradients(backend):
  # 2D convolutions with "same" padding (uneven where strided or of an even
  # kernel), strides, groups, dilation, channels first; depthwise,
  # separable, batch normalization; a Dense head on the flattened maps.
  result = _run("""
      def build():
        x = keras.Input((9, 8, 3))
        h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
        h = keras.layers.Conv2D(6, 3, strides=2, groups=2,
                                activation="relu")(h)
        h = keras.layers.Conv2D(6, 2, strides=2, padding="same",
                                data_format="channels_first")(h)
        h = keras.layers.DepthwiseConv2D(2, dilation_rate=2,
                                         padding="same")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.SeparableConv2D(4, 2, activation="tanh")(h)
        h = keras.layers.Flatten()(h)
        return set_weights(keras.Model(x, keras.layers.Dense(3)(h)))
      x = rng.normal(size=(16, 9, 8, 3)).astype("float32")
      print(json.dumps(measure(build, x, labels)))
      """, backend)
  assert result["units"] == [
      ["BatchNormalization", "Conv2D", "Conv2D", "Conv2D", "Dense",
       "DepthwiseConv2D", "SeparableConv2D"], 0]
  _assert_equal_to_mapped(result)


@pytest.mark.slow
def test_3d_convolutions_equal_the_mapped_gradients(backend):
  # The taps' shifted inputs are N-D on both backends.
  result = _run("""
      def build():
        x = keras.Input((4, 5, 6, 2))
        h = keras.layers.Conv3D(3, 2, strides=2, padding="same",
                                activation="relu")(x)
        h = keras.layers.Conv3D(2, (1, 2, 2), dilation_rate=(1, 1, 2))(h)
        h = keras.layers.Flatten()(h)
        return set_weights(keras.Model(x, keras.layers.Dense(3)(h)))
      x = rng.normal(size=(16, 4, 5, 6, 2)).astype("float32")
      print(json.dumps(measure(build, x)))
      """, backend)
  # `per_sample.plan` leaves a dilated 3D convolution to the mapped
  # gradients of the model (TensorFlow has no dilated volume patches).
  assert result["units"] == [["Conv3D", "Dense"], 2]
  _assert_equal_to_mapped(result)


def test_text_layers_equal_the_mapped_gradients(backend):
  # Embedding (ids repeated within a sample), causal and channels-first
  # Conv1D, a Dense layer on sequences called twice (shared), LayerNorm.
  result = _run("""
      def build():
        x = keras.Input((10,), dtype="int32")
        h = keras.layers.Embedding(12, 5)(x)
        h = keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2,
                                activation="relu")(h)
        h = keras.layers.Conv1D(4, 2, strides=2, data_format="channels_first",
                                activation="relu")(h)
        h = keras.layers.Permute((2, 1))(h)  # (batch, 3, 4)
        shared = keras.layers.Dense(4, activation="tanh")
        h = keras.layers.LayerNormalization()(shared(shared(h)))
        h = keras.layers.GlobalAveragePooling1D()(h)
        return set_weights(keras.Model(x, keras.layers.Dense(3)(h)))
      x = rng.integers(0, 12, (16, 10)).astype("int32")
      assert all(len(set(row)) < len(row) for row in x)
      print(json.dumps(measure(build, x, labels)))
      """, backend)
  assert result["units"] == [
      ["Conv1D", "Conv1D", "Dense", "Dense", "Embedding",
       "LayerNormalization"], 0]
  _assert_equal_to_mapped(result)


@pytest.mark.slow  # Beside the two above, for CI's time.
def test_other_layers_are_mapped_beside_the_closed_forms(backend):
  # A recurrent layer has no closed form here: its variables alone come
  # from the mapped gradients; a second head off `output_fn`'s path gets
  # zero importance (its probe is unused).
  result = _run("""
      def build():
        x = keras.Input((6,), dtype="int32")
        h = keras.layers.Embedding(9, 4)(x)
        h = keras.layers.SimpleRNN(5)(h)
        first = keras.layers.Dense(3, name="first")(h)
        second = keras.layers.Dense(2, name="second")(h)
        return set_weights(keras.Model(x, [first, second]))
      x = rng.integers(0, 9, (16, 6)).astype("int32")
      print(json.dumps(measure(build, x, labels, output_fn=lambda o: o[0])))
      """, backend)
  assert result["units"] == [["Dense", "Dense", "Embedding"], 3]
  for key in result["closed"]:
    closed, mapped = result["closed"][key], result["mapped"][key]
    tolerances.assert_all_close(closed, mapped)
    assert sum(map(abs, _flat(closed[-2:]))) == 0  # The second head.
    assert all(sum(map(abs, _flat(a))) > 0 for a in closed[:-2])
