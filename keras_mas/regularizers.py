"""MASRegularizer: the MAS penalty `strength · Σ Ω (w − θ*)²` of one variable."""

import math

import keras
from keras import ops

__all__ = ["MASRegularizer", "validate_strength"]


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
class MASRegularizer(keras.regularizers.Regularizer):
  """Quadratic MAS penalty anchoring one variable to its consolidated value.

  `penalty(w) = strength · Σ_ij Ω_ij (w_ij − θ*_ij)²`, where `Ω` is the
  importance of each parameter for earlier tasks and `θ*` its value when they
  were consolidated. Parameters that mattered stay close to their anchors;
  unimportant ones (`Ω ≈ 0`) are free to change.

  `MASModel` makes one of these per trainable variable, all sharing its
  strength variable, so the model's penalty can be changed between tasks
  without retracing. It can also be attached to a variable of a plain model:

  ```python
  kernel = model.layers[0].kernel
  kernel.regularizer = keras_mas.MASRegularizer(
      strength=1.0, importance=omega[0], anchor=kernel.numpy())
  ```

  Args:
    strength: λ, a finite float >= 0, or a scalar variable holding it.
    importance: Ω, a tensor or variable of the variable's shape.
    anchor: θ*, a tensor or variable of the variable's shape.

  Raises:
    ValueError: if `strength` is negative, NaN or infinite.
  """

  def __init__(self, strength=1.0, importance=None, anchor=None):
    if not isinstance(strength, keras.Variable):
      strength = validate_strength(strength)
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
    # Ω and θ* are model state, saved with the model's variables; the config
    # holds plain values only, as Keras regularizer configs do.
    return {"strength": float(ops.convert_to_numpy(self.strength))}
