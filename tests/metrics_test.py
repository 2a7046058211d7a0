"""ACC, BWT, FWT and forgetting against hand-computed matrices."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

# R[i][j]: accuracy on task j after training tasks 0..i.
_R = [[0.9, 0.2, 0.1],
      [0.6, 0.8, 0.3],
      [0.5, 0.7, 0.95]]
_B = [0.1, 0.15, 0.2]


def test_hand_computed_values():
  assert metrics.average_accuracy(_R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
  # BWT: ((0.5 - 0.9) + (0.7 - 0.8)) / 2
  assert metrics.backward_transfer(_R) == pytest.approx(-0.25)
  # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = (0.05 + 0.1) / 2
  assert metrics.forward_transfer(_R, _B) == pytest.approx(0.075)
  # Forgetting: task 0: max(0.9, 0.6) - 0.5; task 1: max(0.2, 0.8) - 0.7.
  assert metrics.forgetting(_R) == pytest.approx((0.4 + 0.1) / 2)
  summary = metrics.summarize(_R, _B)
  assert set(summary) == {"acc", "bwt", "fwt", "forgetting"}


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
  r = [[0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.4, 0.6, 0.8]]
  assert metrics.forgetting(r) == pytest.approx(((0.9 - 0.4) + 0.0) / 2)
  assert metrics.backward_transfer(r) == pytest.approx(((0.4 - 0.5) + 0) / 2)


def test_single_task_has_no_transfer_or_forgetting():
  assert metrics.summarize([[0.7]], [0.1]) == {
      "acc": 0.7, "bwt": 0.0, "fwt": 0.0, "forgetting": 0.0}


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="argument `accuracy_matrix`"):
    metrics.average_accuracy([[1.0, 0.5]])
  with pytest.raises(ValueError, match="argument `baseline`"):
    metrics.forward_transfer(_R, [0.1])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
