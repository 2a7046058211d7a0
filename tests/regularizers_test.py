"""MASRegularizer against the NumPy formula."""

import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mas  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_penalty_matches_numpy_formula():
  rng = np.random.default_rng(0)
  omega, anchor, w = (rng.random((3, 4)).astype("float32") for _ in range(3))
  reg = keras_mas.MASRegularizer(2.5, importance=omega, anchor=anchor)
  expected = 2.5 * np.sum(omega * (w - anchor) ** 2)
  np.testing.assert_allclose(float(reg(w)), expected, rtol=1e-6)
  assert float(reg(anchor)) == 0.0


def test_strength_variable_is_read_at_call_time():
  strength = keras.Variable(1.0, trainable=False)
  reg = keras_mas.MASRegularizer(strength, np.ones(2), np.zeros(2))
  assert float(reg(np.ones(2))) == 2.0
  strength.assign(3.0)
  assert float(reg(np.ones(2))) == 6.0


def test_attached_to_a_plain_model_the_penalty_enters_the_losses():
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  kernel = model.layers[0].kernel
  kernel.regularizer = keras_mas.MASRegularizer(
      1.0, importance=np.ones((2, 1), "float32"),
      anchor=kernel.numpy() + 1.0)
  np.testing.assert_allclose(float(sum(model.losses)), 2.0, rtol=1e-6)


def test_serialization_round_trip():
  reg = keras_mas.MASRegularizer(0.5)
  config = keras.saving.serialize_keras_object(reg)
  restored = keras.saving.deserialize_keras_object(config)
  assert isinstance(restored, keras_mas.MASRegularizer)
  assert restored.get_config() == {"strength": 0.5}
  with pytest.raises(ValueError, match="no importance or anchor"):
    restored(np.ones(2))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "strong",
                                 None])
def test_invalid_strength_is_named(bad):
  with pytest.raises(ValueError, match="argument `strength`"):
    keras_mas.MASRegularizer(bad)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
