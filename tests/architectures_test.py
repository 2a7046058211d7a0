"""Model builders: MLP, CNN, and a keras.applications backbone."""

import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mas  # pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import architectures  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_small_models(name):
  model = architectures.build(name, (8, 8, 1), 10, hidden_units=16)
  assert isinstance(model, keras_mas.MASModel)
  assert model.predict(np.zeros((2, 8, 8, 1)), verbose=0).shape == (2, 10)
  assert model.get_layer("logits").units == 10
  again = architectures.build(name, (8, 8, 1), 10, hidden_units=16)
  for a, b in zip(model.weights, again.weights):  # seeded
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_applications_backbone_from_a_local_weights_file(tmp_path):
  model = architectures.build("MobileNetV2", (32, 32, 3), 4, seed=1)
  backbone = model.get_layer("backbone")
  path = str(tmp_path / "backbone.weights.h5")
  backbone.save_weights(path)
  loaded = architectures.build("MobileNetV2", (32, 32, 3), 4, weights=path,
                               seed=2)
  for a, b in zip(loaded.get_layer("backbone").weights, backbone.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert loaded.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 4)


def test_bad_names_and_missing_weights_are_named(tmp_path):
  with pytest.raises(ValueError, match="argument `model`"):
    architectures.build("resnet9000", (8, 8, 1), 10)
  with pytest.raises(ValueError, match="argument `weights`"):
    architectures.build("MobileNetV2", (32, 32, 3), 4,
                        weights=str(tmp_path / "missing.h5"))
  with pytest.raises(ValueError, match="argument `weights`"):
    architectures.build("mlp", (8, 8, 1), 4, weights="none",
                        freeze_backbone=True)
  with pytest.raises(ValueError, match="argument `input_shape`"):
    architectures.build("mlp", (8, 8), 4)
  wrong = str(tmp_path / "other.weights.h5")
  architectures.build("mlp", (8, 8, 1), 4).save_weights(wrong)
  with pytest.raises(ValueError, match="argument `weights`.*MobileNetV2"):
    architectures.build("MobileNetV2", (32, 32, 3), 4, weights=wrong)


def test_application_names_are_case_insensitive():
  assert architectures.application_name("mobilenetv2") == "MobileNetV2"
  assert architectures.application_name("RESNET50") == "ResNet50"
  assert architectures.application_name("mlp") is None
  assert architectures.application_name("preprocess_input") is None


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (8, 8, 2)])
def test_backbone_takes_raw_inputs_of_any_size_and_channels(shape):
  model = architectures.build("mobilenetv3small", shape, 3, weights="none")
  assert tuple(model.inputs[0].shape[1:]) == shape  # Served as given.
  assert model.get_layer("backbone").inputs[0].shape[1:] == (32, 32, 3)
  x = np.random.default_rng(0).random((2,) + shape).astype("float32")
  assert model.predict(x, verbose=0).shape == (2, 3)
  if shape[-1] == 1:
    # Grey images are the same image in each of the three channels.
    rgb = keras.Model(model.inputs, model.get_layer("to_rgb").output)
    out = keras.ops.convert_to_numpy(rgb(x))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_backbone_minimum_size_is_the_backbones_own():
  model = architectures.build("inceptionv3", (8, 8, 1), 2)
  assert model.get_layer("backbone").inputs[0].shape[1:] == (75, 75, 3)


def test_preprocessing_is_the_applications_and_survives_saving(tmp_path):
  model = architectures.build("mobilenetv2", (8, 8, 1), 2)
  layer = model.get_layer("preprocess")
  x = np.random.default_rng(1).random((2, 32, 32, 3)).astype("float32")
  # mobilenet_v2 expects 0..255 mapped to [-1, 1]; sources give [0, 1].
  np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                             2.0 * x - 1.0, atol=1e-5)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path, safe_mode=True)
  inputs = np.random.default_rng(2).random((2, 8, 8, 1)).astype("float32")
  np.testing.assert_allclose(loaded.predict(inputs, verbose=0),
                             model.predict(inputs, verbose=0), atol=1e-5)


def test_frozen_backbone_trains_only_the_classifier():
  model = architectures.build("mobilenetv3small", (8, 8, 1), 2,
                              freeze_backbone=True)
  assert [v.path for v in model.trainable_variables] == [
      "logits/kernel", "logits/bias"]
  before = [v.numpy() for v in model.get_layer("backbone").weights]
  model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
  model.fit(np.random.default_rng(3).random((8, 8, 8, 1)), np.arange(8) % 2,
            epochs=1, verbose=0)
  for a, b in zip(before, model.get_layer("backbone").weights):
    np.testing.assert_array_equal(a, b.numpy())


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
