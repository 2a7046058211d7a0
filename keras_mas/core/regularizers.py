"""MASRegularizer: the MAS penalty `strength · Σ Ω (w − θ*)²` of one variable."""

import math

import keras
from keras import ops
# Keras's saver (`keras.src.saving.saving_lib._save_state`) stores the state
# of every `KerasSaveable` attribute of a layer through its
# `save_own_variables`, as it does for metrics and optimizers; no public name
# exports the base class in Keras 3.15.
from keras.src.saving.keras_saveable import KerasSaveable
import numpy as np

__all__ = ["MASRegularizer", "attach", "check_saveable", "validate_strength"]


def validate_strength(strength, argument="strength"):
  """Returns `strength` as a float, or raises if it is not finite and >= 0."""
  try:
    value = float(strength)
  except (TypeError, ValueError):
    value = None
  if value is None or not math.isfinite(value) or value < 0:
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected a finite number "
        f">= 0. Received: {argument}={strength!r}"
    )
  return value


@keras.saving.register_keras_serializable(package="keras_mas")
class MASRegularizer(keras.regularizers.Regularizer, KerasSaveable):
  """Quadratic MAS penalty anchoring one variable to its consolidated value.

  `penalty(w) = strength · Σ_ij Ω_ij (w_ij − θ*_ij)²`, where `Ω` is the
  importance of each parameter for earlier tasks and `θ*` its value when they
  were consolidated. Parameters that mattered stay close to their anchors;
  unimportant ones (`Ω ≈ 0`) are free to change.

  `MASModel` computes this penalty for every variable itself; the
  regularizer serves plain Keras models. Attach it in a way Keras saves:
  as a layer's constructor argument, or with `keras_mas.regularizers.attach`
  on a built layer:

  ```python
  omega = keras_mas.importance.mas(model, x_a)      # after learning task A
  layer = model.layers[1]                           # a Dense layer
  keras_mas.regularizers.attach(layer, "kernel", keras_mas.MASRegularizer(
      strength=1.0, importance=omega[0], anchor=layer.kernel.numpy()))
  model.save("after_a.keras")  # λ, Ω and θ* are saved with the layer
  ```

  Saving: λ is in the config (plain values); Ω and θ* are state, written to
  the `.keras` file's weights by `save_own_variables` beside the layer's own
  variables (a config of nested lists would be as large as the layer, and
  JSON). Assigning only `variable.regularizer = ...` is not saved by Keras,
  for any regularizer (the layer's config does not see it): `MASModel.save`
  refuses such a model, naming `attach`.

  Args:
    strength: λ, a finite float >= 0, or a scalar variable holding it.
    importance: Ω, a tensor, array or variable of the variable's shape.
    anchor: θ*, a tensor, array or variable of the variable's shape.

  Raises:
    ValueError: if `strength` is negative, NaN or infinite, or `importance`
      and `anchor` differ in shape.
  """

  def __init__(self, strength=1.0, importance=None, anchor=None):
    if not isinstance(strength, keras.Variable):
      strength = validate_strength(strength)
    if (importance is not None and anchor is not None
        and tuple(importance.shape) != tuple(anchor.shape)):
      raise ValueError(
          "Invalid value for argument `anchor`. Expected the shape of "
          f"`importance`, {tuple(importance.shape)}. Received: anchor of "
          f"shape {tuple(anchor.shape)}")
    self.strength = strength
    self.importance = importance
    self.anchor = anchor

  def __call__(self, x):
    if self.importance is None or self.anchor is None:
      raise ValueError(
          "MASRegularizer has no importance or anchor bound to it: pass "
          "`importance` and `anchor`, or let a MASModel own it."
      )
    x = ops.cast(x, "float32")
    strength = ops.cast(self.strength, "float32")
    drift = x - ops.cast(self.anchor, "float32")
    return strength * ops.sum(ops.cast(self.importance, "float32")
                              * ops.square(drift))

  def get_config(self):
    # Plain values only, as Keras regularizer configs are; Ω and θ* travel
    # with the weights (`save_own_variables`).
    return {"strength": float(ops.convert_to_numpy(self.strength))}

  # Keras's saver walks a layer's attributes and saves the state of each
  # `KerasSaveable` among them. `_obj_type` picks the attributes the walk
  # skips on this object; a regularizer has no saveable children, and of the
  # kinds Keras accepts, a loss (a regularizer is a loss on weights) is the
  # nearest.
  def _obj_type(self):
    return "Loss"

  # `KerasSaveable.__reduce__` pickles a whole model; a regularizer copies
  # and pickles as the plain object it is.
  __reduce__ = object.__reduce__

  def save_own_variables(self, store):
    """Writes Ω and θ*, if bound, into a Keras weights store."""
    if self.importance is not None and self.anchor is not None:
      store["importance"] = _numpy(self.importance)
      store["anchor"] = _numpy(self.anchor)

  def load_own_variables(self, store):
    """Reads Ω and θ* written by `save_own_variables`."""
    keys = set(store.keys())
    if not {"importance", "anchor"} <= keys:
      return
    self.importance = _restored(self.importance, store["importance"],
                                "mas_importance")
    self.anchor = _restored(self.anchor, store["anchor"], "mas_anchor")


def _numpy(value):
  return np.asarray(ops.convert_to_numpy(value), dtype="float32")


def _restored(current, value, name):
  value = np.asarray(value, dtype="float32")
  if (isinstance(current, keras.Variable)
      and tuple(current.shape) == value.shape):
    current.assign(value)
    return current
  # A variable rather than an array, so a traced train step reads it
  # instead of embedding a constant the size of the layer.
  return keras.Variable(value, trainable=False, dtype="float32", name=name)


def attach(layer, name, regularizer):
  """Regularizes the built `layer`'s weight `name` so that saving keeps it.

  Keras serializes a layer's regularizers from its constructor arguments
  (`kernel_regularizer`, ...), so a regularizer set only on the variable
  (`layer.kernel.regularizer = ...`) is lost by `model.save`. This sets
  both: the variable's regularizer, which `fit` and `model.losses` apply,
  and the layer attribute `<name>_regularizer`, which `get_config` and the
  saver see.

  Example:

  ```python
  keras_mas.regularizers.attach(model.layers[1], "kernel",
                                keras_mas.MASRegularizer(1.0, omega, anchor))
  ```

  Args:
    layer: a built `keras.layers.Layer` with a trainable weight `name`.
    name: the weight's attribute, e.g. `"kernel"`, `"bias"`,
      `"embeddings"`, `"gamma"`.
    regularizer: the regularizer, e.g. a `MASRegularizer`.

  Returns:
    `layer`.

  Raises:
    ValueError: if `layer` has no such trainable weight, or its config has
      no `<name>_regularizer` argument (Keras could not save it).
  """
  variable = getattr(layer, name, None)
  if not isinstance(variable, keras.Variable) or not variable.trainable:
    raise ValueError(
        "Invalid value for argument `name`. Expected the attribute of a "
        f"trainable weight of the built layer '{layer.name}'. Received: "
        f"name={name!r}")
  argument = f"{name}_regularizer"
  if argument not in layer.get_config():
    raise ValueError(
        f"Invalid value for argument `name`. Layer '{layer.name}' has no "
        f"`{argument}` argument, so Keras cannot save a regularizer on "
        f"'{name}'. Received: name={name!r}")
  setattr(layer, argument, regularizer)
  variable.regularizer = regularizer
  return layer


def check_saveable(model):
  """Raises if a `MASRegularizer` of `model` would be lost by saving.

  Args:
    model: a `keras.Model` (or layer).

  Raises:
    ValueError: naming the variables whose `MASRegularizer` is set on the
      variable alone, not on the layer argument that Keras saves.
  """
  lost = []
  for layer in model._flatten_layers(include_self=True):  # pylint: disable=protected-access
    for v in layer._trainable_variables + layer._non_trainable_variables:  # pylint: disable=protected-access
      regularizer = v.regularizer
      if (isinstance(regularizer, MASRegularizer)
          and getattr(layer, f"{v.name}_regularizer", None) is not regularizer):
        lost.append(v.path)
  if lost:
    raise ValueError(
        f"Cannot save model '{model.name}': the MASRegularizer of {lost} is "
        "set on the variable alone (`variable.regularizer = ...`), which "
        "Keras does not save, so its penalty would be lost. Attach it with "
        "`keras_mas.regularizers.attach(layer, name, regularizer)` or pass "
        "it as the layer's constructor argument (`kernel_regularizer=...`).")
