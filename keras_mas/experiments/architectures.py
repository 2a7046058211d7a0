"""Models for task sequences: an MLP, a small CNN, a keras.applications net."""

import importlib
import os
import re

import keras

from keras_mas.core import models

__all__ = ["ARCHITECTURES", "ApplicationPreprocessing", "application_name",
           "build"]

ARCHITECTURES = ("mlp", "cnn")
# Smallest input side every keras.applications backbone accepts unless its
# own check asks for more (InceptionV3 asks 75, Xception 71).
_MIN_SIDE = 32


def application_name(name):
  """The `keras.applications` model called `name`, case-insensitively.

  Example:

  ```python
  application_name("mobilenetv2")  # "MobileNetV2"
  application_name("mlp")  # None
  ```

  Returns:
    The exact name (e.g. `"MobileNetV2"`), or None if there is none.
  """
  if not isinstance(name, str):
    return None
  names = {n.lower(): n for n in dir(keras.applications)
           if n[:1].isupper() and callable(getattr(keras.applications, n))}
  return names.get(name.lower())


@keras.saving.register_keras_serializable(package="keras_mas")
class ApplicationPreprocessing(keras.layers.Layer):
  """A backbone's own `preprocess_input`, for inputs scaled to [0, 1].

  The sources give images in [0, 1]; `keras.applications` backbones expect
  the pixel range of their training (0–255, then their mode: "caffe", "tf",
  "torch" or none). Inside the model, so the export serves raw inputs.

  Args:
    module: the `keras.applications` module, e.g. `"mobilenet_v2"`.
  """

  def __init__(self, module, **kwargs):
    super().__init__(**kwargs)
    self.module = module
    self._preprocess = importlib.import_module(
        f"keras.applications.{module}").preprocess_input

  def call(self, inputs):
    return self._preprocess(inputs * 255.0)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "module": self.module}


def check_options(name, weights=None, freeze_backbone=False):
  """Raises, naming the argument, unless `build` can make `name` so.

  Args:
    name: as for `build`.
    weights: as for `build`.
    freeze_backbone: as for `build`.

  Returns:
    The `keras.applications` name of `name`, or None for `"mlp"`/`"cnn"`.

  Raises:
    ValueError: for an unknown `name`, weights or a frozen backbone asked of
      a model without a backbone, or a missing `weights` file.
  """
  weights = _weights_file(weights)
  application = application_name(name)
  if name not in ARCHITECTURES and application is None:
    raise ValueError(
        f"Invalid value for argument `model`. Expected one of "
        f"{ARCHITECTURES} or a keras.applications model name (any case, "
        f"e.g. 'MobileNetV2'). Received: model={name!r}")
  if application is None and (weights is not None or freeze_backbone):
    raise ValueError(
        "Invalid value for argument `weights`/`freeze_backbone`. Expected "
        "them only with a keras.applications backbone. Received: "
        f"model={name!r}, weights={weights!r}, "
        f"freeze_backbone={freeze_backbone!r}")
  if weights is not None and not os.path.isfile(weights):
    raise ValueError(
        "Invalid value for argument `weights`. Expected a local weights "
        f"file or 'none'. Received: weights={weights!r} (no such file)")
  return application


def _weights_file(weights):
  if isinstance(weights, str) and weights.lower() == "none":
    return None
  return weights


def build(name, input_shape, num_outputs, hidden_units=128, weights=None,
          freeze_backbone=False, seed=0):
  """Returns a built `MASModel` producing `num_outputs` logits.

  A `keras.applications` backbone takes any image size and channel count:
  inputs smaller than the backbone's minimum are resized up
  (`keras.layers.Resizing`) and grey images repeated to three channels,
  inside the model, so that the model (and its export) takes the raw inputs.

  Example:

  ```python
  model = build("mobilenetv2", (8, 8, 1), 10, freeze_backbone=True)
  model.predict(np.zeros((2, 8, 8, 1)))  # shape (2, 10)
  ```

  Args:
    name: `"mlp"` (two ReLU layers of `hidden_units`), `"cnn"` (two 3×3
      convolutions and a dense layer), or the name of a `keras.applications`
      model in any case (e.g. `"MobileNetV2"`, `"mobilenetv2"`) used as a
      pooled backbone.
    input_shape: shape of one input, e.g. `(8, 8, 1)`.
    num_outputs: number of logits.
    hidden_units: width of the MLP's hidden layers.
    weights: for a `keras.applications` backbone, a local weights file (e.g.
      the backbone's ImageNet `.h5` without top), or `None` / `"none"` for
      random initialisation; never downloaded.
    freeze_backbone: keep a `keras.applications` backbone's weights fixed
      (only the new classifier trains; BatchNorm stays in inference mode).
    seed: seeds the initial weights.

  Returns:
    A `keras_mas.MASModel`.

  Raises:
    ValueError: for an unknown `name`, a missing `weights` file, weights for
      a model without a backbone, or a bad `input_shape`/`num_outputs`.
  """
  try:
    input_shape = tuple(int(d) for d in input_shape)
  except (TypeError, ValueError):
    input_shape = ()
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(
        "Invalid value for argument `input_shape`. Expected (height, width, "
        f"channels) of positive integers. Received: input_shape={input_shape!r}")
  if not isinstance(num_outputs, int) or num_outputs < 1:
    raise ValueError(
        "Invalid value for argument `num_outputs`. Expected a positive "
        f"integer. Received: num_outputs={num_outputs!r}")
  weights = _weights_file(weights)
  application = check_options(name, weights, freeze_backbone)
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(tuple(input_shape), name="image")
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
  else:
    x = _backbone(application, inputs, weights, freeze_backbone)
  outputs = keras.layers.Dense(num_outputs, name="logits")(x)
  return models.MASModel(inputs, outputs, name=name.lower())


def _backbone(application, inputs, weights, freeze):
  """The pooled backbone on `inputs`, resized and given 3 channels."""
  height, width, channels = inputs.shape[1:]
  constructor = getattr(keras.applications, application)
  side = _MIN_SIDE
  while True:
    shape = (max(height, side), max(width, side), 3)
    try:
      backbone = constructor(include_top=False, weights=None,
                             input_shape=shape, pooling="avg",
                             name="backbone")
      break
    except ValueError as e:
      # keras.applications says its own minimum: "at least 75x75".
      found = re.search(r"at least (\d+)x(\d+)", str(e))
      if found is None or int(found.group(1)) <= side:
        raise
      side = int(found.group(1))
  if weights is not None:
    try:
      backbone.load_weights(weights)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          "Invalid value for argument `weights`. Expected a weights file of "
          f"{application} without its top (include_top=False). Received: "
          f"weights={weights!r} ({type(e).__name__}: {e})") from e
  backbone.trainable = not freeze
  x = inputs
  if (height, width) != shape[:2]:
    x = keras.layers.Resizing(shape[0], shape[1], name="resize")(x)
  if channels == 1:
    x = keras.layers.Concatenate(name="to_rgb")([x, x, x])
  elif channels != 3:
    x = keras.layers.Conv2D(3, 1, name="to_rgb")(x)
  module = constructor.__module__.rsplit(".", 1)[-1]
  x = ApplicationPreprocessing(module, name="preprocess")(x)
  # training=False when frozen: BatchNorm keeps its ImageNet statistics.
  return backbone(x, training=False) if freeze else backbone(x)
