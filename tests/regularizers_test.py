"""MASRegularizer against the NumPy formula."""

import copy
import os
import pickle
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mas  # pylint: disable=g-import-not-at-top,wrong-import-position
import tolerances  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_penalty_matches_numpy_formula():
  rng = np.random.default_rng(0)
  omega, anchor, w = (rng.random((3, 4)).astype("float32") for _ in range(3))
  reg = keras_mas.MASRegularizer(2.5, importance=omega, anchor=anchor)
  expected = 2.5 * np.sum(omega * (w - anchor) ** 2)
  tolerances.assert_close(float(reg(w)), expected)
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
  tolerances.assert_close(float(sum(model.losses)), 2.0)


def test_serialization_round_trip():
  reg = keras_mas.MASRegularizer(0.5)
  config = keras.saving.serialize_keras_object(reg)
  restored = keras.saving.deserialize_keras_object(config)
  assert isinstance(restored, keras_mas.MASRegularizer)
  assert restored.get_config() == {"strength": 0.5}
  with pytest.raises(ValueError, match="no importance or anchor"):
    restored(np.ones(2))


def _regularized_model(seed=0):
  """A plain model with one MASRegularizer attached each supported way."""
  rng = np.random.default_rng(seed)
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((5,))
  hidden = keras.layers.Dense(
      4, activation="tanh", name="by_constructor",
      kernel_regularizer=keras_mas.MASRegularizer(
          0.5, importance=rng.random((5, 4)).astype("float32"),
          anchor=rng.normal(size=(5, 4)).astype("float32")))(inputs)
  outputs = keras.layers.Dense(3, name="attached_after_build")(hidden)
  model = keras.Model(inputs, outputs)
  head = model.get_layer("attached_after_build")
  keras_mas.regularizers.attach(head, "kernel", keras_mas.MASRegularizer(
      2.0, importance=rng.random((4, 3)).astype("float32"),
      anchor=rng.normal(size=(4, 3)).astype("float32")))
  return model


def _penalty_and_gradients(model):
  with tf.GradientTape() as tape:
    penalty = tf.add_n(model.losses)
  kernels = [layer.kernel for layer in model.layers[1:]]
  return float(penalty), [g.numpy() for g in tape.gradient(penalty, kernels)]


def _numpy_penalty(model):
  total = 0.0
  for layer in model.layers[1:]:
    reg = layer.kernel_regularizer
    omega, anchor = (keras.ops.convert_to_numpy(a)
                     for a in (reg.importance, reg.anchor))
    total += reg.strength * np.sum(omega * (layer.kernel.numpy() - anchor) ** 2)
  return total


@pytest.mark.parametrize("save", ["model", "weights"])
def test_both_ways_of_attaching_survive_saving(save, tmp_path):
  model = _regularized_model()
  penalty, gradients = _penalty_and_gradients(model)
  tolerances.assert_close(penalty, _numpy_penalty(model))
  if save == "model":
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
  else:
    model.save_weights(tmp_path / "m.weights.h5")
    restored = _regularized_model(seed=1)  # Other Ω, θ*, weights.
    restored.load_weights(tmp_path / "m.weights.h5")
  for name in ("by_constructor", "attached_after_build"):
    layer = restored.get_layer(name)
    assert layer.kernel.regularizer is layer.kernel_regularizer
    assert isinstance(layer.kernel_regularizer, keras_mas.MASRegularizer)
  restored_penalty, restored_gradients = _penalty_and_gradients(restored)
  np.testing.assert_allclose(restored_penalty, penalty, rtol=1e-6)
  for g, r in zip(gradients, restored_gradients):
    np.testing.assert_allclose(r, g, rtol=1e-6, atol=1e-7)


def test_reloaded_model_trains_its_next_task_with_the_same_penalty(tmp_path):
  model = _regularized_model()
  model.save(tmp_path / "m.keras")
  restored = keras.models.load_model(tmp_path / "m.keras")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 5)).astype("float32")
  y = rng.integers(0, 3, 64)
  for m in (model, restored):
    m.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
  for a, b in zip(model.get_weights(), restored.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # The penalty did act: training without it ends elsewhere.
  free = keras.models.clone_model(model)
  free.set_weights(keras.models.load_model(tmp_path / "m.keras").get_weights())
  for layer in free.layers[1:]:
    layer.kernel.regularizer = None
  free.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  free.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
  assert not np.allclose(free.get_weights()[0], model.get_weights()[0],
                         atol=1e-4)


def test_variable_alone_is_refused_by_mas_model_before_writing(tmp_path):
  inputs = keras.Input((2,))
  model = keras_mas.MASModel(inputs, keras.layers.Dense(1, name="d")(inputs))
  path = tmp_path / "m.keras"
  model.save(path)
  saved = path.read_bytes()
  kernel = model.get_layer("d").kernel
  kernel.regularizer = keras_mas.MASRegularizer(
      1.0, np.ones((2, 1), "float32"), np.zeros((2, 1), "float32"))
  for save in (model.save, model.save_weights, keras.saving.save_model):
    target = path if save is not model.save_weights else (
        tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match=r"d/kernel.*keras_mas.regularizers"
                       r"\.attach.*kernel_regularizer"):
      if save is keras.saving.save_model:
        save(model, tmp_path / "other.keras")
      else:
        save(target)
  assert path.read_bytes() == saved
  keras_mas.regularizers.attach(model.get_layer("d"), "kernel",
                                kernel.regularizer)
  model.save(path)
  restored = keras.models.load_model(path)
  np.testing.assert_allclose(float(sum(restored.losses)),
                             float(sum(model.losses)), rtol=1e-6)


def test_attach_refuses_what_keras_could_not_save():
  layer = keras.layers.Dense(2)
  layer.build((None, 3))
  reg = keras_mas.MASRegularizer(1.0, np.ones((3, 2)), np.zeros((3, 2)))
  with pytest.raises(ValueError, match="argument `name`.*'gamma'"):
    keras_mas.regularizers.attach(layer, "gamma", reg)
  depthwise = keras.layers.DepthwiseConv2D(3)
  depthwise.build((None, 8, 8, 2))
  # Its weight is `kernel` but its argument `depthwise_regularizer`: the
  # config would not bring a `kernel_regularizer` back on loading.
  with pytest.raises(ValueError, match="no `kernel_regularizer`"):
    keras_mas.regularizers.attach(depthwise, "kernel", reg)
  assert depthwise.kernel.regularizer is None
  assert layer.kernel.regularizer is None


def test_copies_and_pickles_as_a_plain_object():
  reg = keras_mas.MASRegularizer(3.0, np.ones(2), np.zeros(2))
  for clone in (copy.deepcopy(reg), pickle.loads(pickle.dumps(reg))):
    assert float(clone(np.ones(2))) == 6.0


def test_mismatched_importance_and_anchor_are_refused():
  with pytest.raises(ValueError, match="argument `anchor`"):
    keras_mas.MASRegularizer(1.0, np.ones((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "strong",
                                 None])
def test_invalid_strength_is_named(bad):
  with pytest.raises(ValueError, match="argument `strength`"):
    keras_mas.MASRegularizer(bad)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
