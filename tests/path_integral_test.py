"""PathIntegral: SI's ω = Σ −g·Δθ against hand-computed steps."""

import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import path_integral  # pylint: disable=g-import-not-at-top,wrong-import-position
import tolerances  # pylint: disable=g-import-not-at-top,wrong-import-position


def _zeros_like(v, name):
  return keras.Variable(np.zeros(v.shape, "float32"), trainable=False,
                        name=name)


def test_create_starts_at_the_current_weights_with_zero_integral():
  w = keras.Variable(np.array([1.0, -2.0], "float32"))
  path = path_integral.PathIntegral.create([w], _zeros_like)
  np.testing.assert_array_equal(path.starts[0].numpy(), [1.0, -2.0])
  np.testing.assert_array_equal(path.integrals[0].numpy(), [0.0, 0.0])


@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
def test_integral_is_minus_gradient_times_step_with_loss_scale_undone(
    loss_scale):
  w = keras.Variable(np.array([1.0, -2.0], "float32"))
  b = keras.Variable(np.array([0.5], "float32"))
  path = path_integral.PathIntegral.create([w, b], _zeros_like)
  expected = np.zeros(2)
  for g, step in (([0.5, -1.0], [0.1, 0.3]), ([2.0, 1.0], [-0.2, 0.05])):
    g = np.array(g, "float32")
    # `b` has no gradient (unused): it is skipped.
    token = path.before_step([w, b], [g * loss_scale, None], loss_scale)
    w.assign(w.numpy() + np.array(step, "float32"))
    b.assign([9.0])
    path.after_step(token)
    expected += -g * np.array(step)
  tolerances.assert_close(path.integrals[0].numpy(), expected)
  np.testing.assert_array_equal(path.integrals[1].numpy(), [0.0])
  path.restart()
  np.testing.assert_array_equal(path.integrals[0].numpy(), [0.0, 0.0])
  np.testing.assert_allclose(path.starts[0].numpy(), w.numpy())
  np.testing.assert_array_equal(path.starts[1].numpy(), [9.0])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
