"""Models for task sequences: an MLP, a small CNN, a keras.applications net."""

import os

import keras

from keras_mas import models

__all__ = ["ARCHITECTURES", "build"]

ARCHITECTURES = ("mlp", "cnn")


def build(name, input_shape, num_outputs, hidden_units=128, weights=None,
          seed=0):
  """Returns a built `MASModel` producing `num_outputs` logits.

  Args:
    name: `"mlp"` (two ReLU layers of `hidden_units`), `"cnn"` (two 3×3
      convolutions and a dense layer), or the name of a `keras.applications`
      model (e.g. `"MobileNetV2"`) used as a pooled backbone.
    input_shape: shape of one input, e.g. `(8, 8, 1)`.
    num_outputs: number of logits.
    hidden_units: width of the MLP's hidden layers.
    weights: for a `keras.applications` backbone, a local weights file or
      `None` (random initialisation); never downloaded.
    seed: seeds the initial weights.

  Returns:
    A `keras_mas.MASModel`.

  Raises:
    ValueError: for an unknown `name` or a missing `weights` file.
  """
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(input_shape, name="image")
  if name == "mlp":
    # Fixed layer names keep TensorBoard tags and checkpoints comparable.
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden_0")(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden_1")(x)
  elif name == "cnn":
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu",
                            name="conv_0")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            name="conv_1")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden_0")(x)
  elif hasattr(keras.applications, name) and name[0].isupper():
    if weights is not None and not os.path.exists(weights):
      raise ValueError(
          "Invalid value for argument `weights`. Expected a local weights "
          f"file or None. Received: weights={weights!r} (no such file)")
    backbone = getattr(keras.applications, name)(
        include_top=False, weights=None, input_shape=input_shape,
        pooling="avg", name="backbone")
    if weights is not None:
      backbone.load_weights(weights)
    x = backbone(inputs)
  else:
    raise ValueError(
        f"Invalid value for argument `model`. Expected one of "
        f"{ARCHITECTURES} or a keras.applications model name. Received: "
        f"model={name!r}")
  outputs = keras.layers.Dense(num_outputs, name="logits")(x)
  return models.MASModel(inputs, outputs, name=name)
