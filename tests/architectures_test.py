"""Model builders: MLP, CNN, and a keras.applications backbone."""

import os
import sys

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


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
