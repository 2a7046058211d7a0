"""Argument checks shared by the task-free modules, named Keras-style."""

import numpy as np


def positive_int(name, value):
  """`value` as an int; raises, naming `name`, unless it is an integer >= 1."""
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a positive integer. "
        f"Received: {name}={value!r}")
  return int(value)


def non_negative(name, value):
  """`value` as a float; raises, naming `name`, unless finite and >= 0."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not np.isfinite(number) or number < 0:
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a finite number >= 0. "
        f"Received: {name}={value!r}")
  return number


def fraction(name, value):
  """`value` as a float; raises, naming `name`, unless in [0, 1)."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not 0 <= number < 1:
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a number in [0, 1). "
        f"Received: {name}={value!r}")
  return number
