"""Tests of keras_mas.task_free.loss_window: peaks and plateaus, scale-free."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import loss_window  # pylint: disable=g-import-not-at-top,wrong-import-position


def _drifting_losses(change_points, length, seed=0, start=2.0, floor=0.05,
                     decay=6.0, noise=0.5):
  """Loss of a learner meeting new data at `change_points`: a jump to about
  `start`, then an exponential decay to `floor`, each loss multiplied by
  heavy-tailed (log-normal) noise, as small batches give."""
  rng = np.random.default_rng(seed)
  losses = []
  starts = list(change_points) + [length]
  for begin, end in zip(starts[:-1], starts[1:]):
    t = np.arange(end - begin)
    level = floor + (start - floor) * np.exp(-t / decay)
    losses.extend(level * rng.lognormal(0.0, noise, len(t)))
  return np.array(losses)


def _events(window, losses):
  return [window.update(v) for v in losses]


# Cross-entropy of 2-class tasks learned fast (from ln 2 ≈ 0.7 to ~0.01)
# and of 10-class tasks learned slowly (from ln 10 ≈ 2.3 to ~0.3): one set
# of defaults must find the changes of both.
_STREAMS = {
    "2-class": dict(start=0.7, floor=0.01, decay=4.0),
    "10-class": dict(start=2.3, floor=0.3, decay=25.0),
}


class TestLossWindow:

  @pytest.mark.parametrize("kind", sorted(_STREAMS))
  def test_a_peak_after_each_change_and_a_plateau_after_each_peak(self, kind):
    # Ten streams of each kind: every hidden change is found within two
    # windows, its plateau comes once the loss has settled, and chance peaks
    # in the 1,050 stationary steps after the last change are rare (about
    # 0.2 a stream; with a fixed 95 % quantile, about 1).
    change_points = [0, 150, 350]
    chance = 0
    for seed in range(10):
      losses = _drifting_losses(change_points, 1400, seed=seed,
                                **_STREAMS[kind])
      window = loss_window.LossWindow()
      events = _events(window, losses)
      assert window.plateaus == [s + 1 for s, e in enumerate(events)
                                 if e == "plateau"]
      assert window.peaks == [0] + [s + 1 for s, e in enumerate(events)
                                    if e == "peak"]
      found = [next(p for p in window.peaks[1:] if p > start)
               for start in change_points[1:]]
      for start, peak in zip(change_points[1:], found):
        assert peak <= start + 2 * window.window_size, (seed, window.peaks)
      for peak, end in zip([0] + found, change_points[1:] + [1400]):
        plateau = next(p for p in window.plateaus if p > peak)
        assert peak + 2 * window.window_size <= plateau < end, (
            seed, window.plateaus)
      chance += len(window.peaks) - 1 - len(found)
    assert chance <= 5

  def test_the_same_events_at_any_loss_scale(self):
    # Every rule compares the stream with itself (ranks, ratios, standard
    # errors): a loss in other units changes nothing.
    losses = _drifting_losses([0, 120, 300], 600, seed=3)
    expected = _events(loss_window.LossWindow(), losses)
    assert "peak" in expected and "plateau" in expected
    for scale in (1e-3, 7.0, 1e4):
      assert _events(loss_window.LossWindow(), scale * losses) == expected

  def test_no_plateau_without_learning(self):
    window = loss_window.LossWindow()
    rng = np.random.default_rng(1)
    assert "plateau" not in _events(
        window, 1.5 * rng.lognormal(0.0, 0.3, 400))

  def test_heavy_tailed_noise_on_a_long_plateau_is_not_a_peak(self):
    # Small-batch losses of a learned task: mostly near zero, now and then
    # a batch 100 times the median (Fashion-MNIST's 99th percentile is 2,
    # its median 0.001). The quantile tightens as the plateau lasts, so
    # chance peaks do not grow with its length.
    rng = np.random.default_rng(2)
    window = loss_window.LossWindow()
    learning = _drifting_losses([0], 40, seed=2, start=2.3, floor=0.3,
                                decay=5.0)
    noise = 0.001 * rng.lognormal(0.0, 2.0, 6000)
    events = _events(window, np.concatenate([learning, noise]))
    assert events.count("plateau") == 1
    assert events.count("peak") <= 1

  def test_rules_mean_what_they_say(self):
    def window():
      return loss_window.LossWindow(window_size=2, peak_quantile=0.5,
                                    peak_min_high=2,
                                    peak_min_relative_rise=1.0,
                                    plateau_fall_stddevs=0.0,
                                    plateau_min_relative_drop=0.5)
    learned = [4.0, 4.0, 2.0, 1.0]
    first = window()
    # The stream's start is the peak; the highest window mean is 4. At step
    # 4 the mean 1.5 is below half of it, but fell from 4: still falling.
    assert _events(first, learned) == [None] * 4
    # Windows [1, 1] after [4, 2], then after [2, 1]: still falling (by
    # more than 0 standard errors).
    assert [first.update(1.0) for _ in range(2)] == [None, None]
    # [1, 1] after [1, 1]: stopped falling, below 2, no loss above 4.
    assert first.update(1.0) == "plateau"
    assert first.plateau_losses == [1.0, 1.0]
    assert first.high_level == pytest.approx(1.0)  # The median: q = 0.5.
    assert first.peak_level == pytest.approx(2.0)  # Twice the mean.
    # Two high losses but a mean of 1.9 < 2: no peak; then 2.2: a peak.
    assert [first.update(v) for v in (1.9, 1.9, 2.5)] == [None, None, "peak"]
    second = window()
    assert _events(second, learned + [1.0] * 3)[-1] == "plateau"
    # A mean of 3 > 2, but one high loss of two: no peak.
    assert second.update(5.0) is None

  def test_absolute_rules_are_extra_conditions(self):
    losses = _drifting_losses([0], 200, seed=4)
    plain = loss_window.LossWindow()
    _events(plain, losses)
    # The losses settle near 0.05: a plateau below 0.2 comes as before; a
    # bound of 0.01 is never met.
    bounded = loss_window.LossWindow(plateau_mean_below=0.2)
    events = _events(bounded, losses)
    assert events.count("plateau") == 1
    assert bounded.plateaus[0] >= plain.plateaus[0]
    assert np.mean(losses[bounded.plateaus[0] - 5:bounded.plateaus[0]]) < 0.2
    never = loss_window.LossWindow(plateau_mean_below=0.01)
    assert "plateau" not in _events(never, losses)
    floor = loss_window.LossWindow(peak_min_rise=10.0, peak_stddevs=2.0)
    _events(floor, losses)
    assert floor.peak_level >= floor.plateau_mean + 10.0

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
      {"peak_min_rise": float("inf")}, {"peak_quantile": 1.0},
      {"peak_min_high": 6}, {"peak_min_relative_rise": -0.5},
      {"plateau_fall_stddevs": float("nan")},
      {"plateau_min_relative_drop": 1.0}])
  def test_bad_arguments_name_themselves(self, kwargs):
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
      loss_window.LossWindow(**kwargs)

  def test_bad_loss_and_state_change_nothing(self):
    window = loss_window.LossWindow(window_size=2, peak_min_high=2)
    window.update(1.0)
    before = window.get_state()
    with pytest.raises(ValueError, match="`loss`"):
      window.update(float("nan"))
    with pytest.raises(ValueError, match="`state`"):
      window.set_state({"losses": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="`state`"):
      window.set_state(dict(before, losses=[1.0] * 5))
    assert window.get_state() == before
