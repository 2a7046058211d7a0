"""Tests of keras_mas.loss_window: peaks and plateaus of a loss stream."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import loss_window  # pylint: disable=g-import-not-at-top,wrong-import-position


def _drifting_losses(change_points, length, seed=0, noise=0.03):
  """Loss of a learner meeting new data at `change_points`: a jump to ~2,
  then an exponential decay to ~0.05, with noise."""
  rng = np.random.default_rng(seed)
  losses = []
  starts = list(change_points) + [length]
  for start, stop in zip(starts[:-1], starts[1:]):
    t = np.arange(stop - start)
    losses.extend(0.05 + 2.0 * np.exp(-t / 6.0)
                  + noise * rng.standard_normal(len(t)))
  return np.maximum(np.array(losses), 0.0)


class TestLossWindow:

  def test_one_plateau_after_each_change_none_while_stationary(self):
    change_points = [0, 120, 300]
    window = loss_window.LossWindow()
    events = [window.update(v) for v in _drifting_losses(change_points, 600)]
    plateaus = [s + 1 for s, e in enumerate(events) if e == "plateau"]
    peaks = [s + 1 for s, e in enumerate(events) if e == "peak"]
    assert window.plateaus == plateaus
    # One plateau per stretch, shortly after its change point, none in the
    # 300 stationary steps that follow the last one.
    assert len(plateaus) == 3
    for start, plateau in zip(change_points, plateaus):
      assert start < plateau < start + 40
    # A peak within a window's length of each hidden change.
    assert len(peaks) == 2
    for start, peak in zip(change_points[1:], peaks):
      assert start < peak <= start + window.window_size
    assert window.peaks == [0] + peaks

  def test_no_plateau_without_learning(self):
    window = loss_window.LossWindow()
    rng = np.random.default_rng(1)
    events = [window.update(v) for v in 1.5 + 0.1 * rng.standard_normal(200)]
    assert "plateau" not in events

  def test_noise_on_a_plateau_is_not_a_peak(self):
    window = loss_window.LossWindow()
    rng = np.random.default_rng(2)
    losses = np.abs(0.05 + 0.05 * rng.standard_normal(500))
    events = [window.update(v) for v in losses]
    assert events.count("plateau") == 1
    assert "peak" not in events

  def test_thresholds_mean_what_they_say(self):
    window = loss_window.LossWindow(window_size=3, plateau_mean_below=0.5,
                                  plateau_variance_below=0.01,
                                  peak_stddevs=1.0, peak_min_rise=0.1)
    assert [window.update(v) for v in (0.4, 0.4)] == [None, None]
    assert window.update(0.4) == "plateau"
    assert window.mean == pytest.approx(0.4)
    assert window.peak_level == pytest.approx(0.5)
    assert window.update(0.69) is None  # Mean 0.4967: not above 0.5.
    assert window.update(0.70) == "peak"
    # Mean below 0.5 but variance above 0.01: not settled.
    assert window.update(0.1) is None
    assert [window.update(v) for v in (0.1, 0.1)] == [None, "plateau"]

  def test_state_round_trip_continues_identically(self):
    losses = _drifting_losses([0, 50, 110], 200, seed=3)
    whole = loss_window.LossWindow()
    expected = [whole.update(v) for v in losses]
    first = loss_window.LossWindow()
    for v in losses[:77]:
      first.update(v)
    state = json.loads(json.dumps(first.get_state()))  # Plain values.
    resumed = loss_window.LossWindow()
    resumed.set_state(state)
    assert [resumed.update(v) for v in losses[77:]] == expected[77:]
    assert resumed.get_state() == whole.get_state()

  @pytest.mark.parametrize("kwargs", [
      {"window_size": 0}, {"window_size": 2.5}, {"plateau_mean_below": -1},
      {"plateau_variance_below": float("nan")}, {"peak_stddevs": "x"},
      {"peak_min_rise": float("inf")}])
  def test_bad_arguments_name_themselves(self, kwargs):
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
      loss_window.LossWindow(**kwargs)

  def test_bad_loss_and_state_change_nothing(self):
    window = loss_window.LossWindow(window_size=2)
    window.update(1.0)
    before = window.get_state()
    with pytest.raises(ValueError, match="`loss`"):
      window.update(float("nan"))
    with pytest.raises(ValueError, match="`state`"):
      window.set_state({"losses": [1.0, 2.0, 3.0]})
    assert window.get_state() == before
