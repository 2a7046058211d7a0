"""Checks of the options both runners take, each naming the argument."""

import keras
import numpy as np

__all__ = ["check_optimizer", "positive_integers", "validate_learning_rate"]


def validate_learning_rate(learning_rate):
  """Raises, naming it, unless `learning_rate` is a finite number > 0."""
  if (isinstance(learning_rate, bool)
      or not isinstance(learning_rate, (int, float, np.floating))
      or not np.isfinite(learning_rate) or learning_rate <= 0):
    raise ValueError(
        "Invalid value for argument `learning_rate`. Expected a finite "
        f"number > 0. Received: learning_rate={learning_rate!r}")


def check_optimizer(optimizer, learning_rate):
  """A new Keras optimizer `optimizer` (a name) at `learning_rate`.

  Raises:
    ValueError: naming `learning_rate` or `optimizer`, if invalid.
  """
  validate_learning_rate(learning_rate)
  try:
    return keras.optimizers.get({"class_name": optimizer,
                                 "config": {"learning_rate": learning_rate}})
  except (ValueError, TypeError) as e:
    raise ValueError(
        "Invalid value for argument `optimizer`. Expected a Keras optimizer "
        f"name such as 'adam' or 'sgd'. Received: optimizer={optimizer!r}"
    ) from e


def positive_integers(**values):
  """Raises, naming the first, unless every value is an integer >= 1."""
  for name, value in values.items():
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(
          f"Invalid value for argument `{name}`. Expected a positive integer. "
          f"Received: {name}={value!r}")
