"""LossWindow: peaks and plateaus in a stream of losses, on the loss's own scale.

The trigger of task-free MAS (Aljundi, Kelchtermans and Tuytelaars, CVPR
2019): a rise of the recent losses well above the last plateau is a *peak*
(the data changed); after a peak, recent losses that have stopped falling
are a *plateau* (it has been learned).

The paper states its thresholds in loss units. Those suit one loss scale:
0.1's defaults (cross-entropy 0.2, a rise of 0.15) fit 2-class tasks,
fired late or on noise on 10-class ones, and 118 times for 5 hidden tasks
on Fashion-MNIST, whose small-batch losses are heavy-tailed (median 0.000,
95th percentile 0.5, 99th 2.0 once a task is learned). Here the default
rules use only the stream's own statistics, ranks and ratios, so one set
holds for 2-class and 10-class tasks and for losses of any scale or
distribution. The absolute thresholds remain, off by default, as extra
conditions.
"""

import numpy as np

from keras_mas.task_free import _checks

__all__ = ["DEFAULT_PEAK_MIN_HIGH", "DEFAULT_PEAK_MIN_RELATIVE_RISE",
           "DEFAULT_PEAK_QUANTILE", "DEFAULT_PLATEAU_FALL_STDDEVS",
           "DEFAULT_PLATEAU_MIN_RELATIVE_DROP", "DEFAULT_WINDOW_SIZE",
           "LossWindow"]

# Losses in the window: few enough that a change shows within a short
# task's first batches (split digits' tasks last 27 batches of 10). Every
# default was chosen on recorded loss streams of the task-free guide's streams
# (benchmarks/CHOICES.md has the comparison).
DEFAULT_WINDOW_SIZE = 5
# A loss is *high* if it exceeds this quantile of the plateau's losses ...
DEFAULT_PEAK_QUANTILE = 0.95
# ... and a peak needs at least this many high losses in the window. On a
# stationary plateau each loss is high with probability 0.05, so 3 of 5 by
# chance has probability 10 · 0.05³ ≈ 0.001 a batch, whatever the loss's
# scale or tail; a change that lifts most losses shows within 3 batches.
DEFAULT_PEAK_MIN_HIGH = 3
# ... and the window mean must be at least (1 + this) times the plateau's
# mean loss (a doubling): ranks alone would call a plateau near zero loss
# changed by any small shift.
DEFAULT_PEAK_MIN_RELATIVE_RISE = 1.0
# A plateau: the window mean is not below the previous window's by more than
# this many standard errors of their difference (it stopped falling) ...
# (0.5 rather than 1: the plateau comes a little later, once the loss has
# flattened; ACC on permuted digits 0.637 against 0.619 over 3 seeds.)
DEFAULT_PLATEAU_FALL_STDDEVS = 0.5
# ... it is at least this fraction below the highest window mean since the
# peak (something was learned), and no loss in it is above that highest
# mean (the peak has left the window: its losses would inflate the
# plateau's statistics and hide the next change).
DEFAULT_PLATEAU_MIN_RELATIVE_DROP = 0.5
# Beyond this many losses on a plateau the quantile tightens, to
# 1 − (1 − peak_quantile) · √(this / n) after n: chance peaks would otherwise
# grow with the plateau's length (about 25 on one run of permuted
# Fashion-MNIST, 6,000 batches a task); tightened, their expected number
# over a plateau of any length stays below 10 · 0.05³ · (this + 2 · this)
# ≈ 0.4.
_TIGHTEN_AFTER = 100
# The plateau's losses kept for its quantile: the most recent ones.
_HISTORY = 1000


def _optional(name, value):
  return None if value is None else _checks.non_negative(name, value)


class LossWindow:
  """Detects peaks and plateaus in a stream of losses, with no loss scale.

  The *window* is the last `window_size` losses; `m` its mean.

  * A **plateau** (the data has been learned), at least `2 * window_size`
    losses after a peak: `m` has stopped falling (it is not below the
    previous window's mean by more than `plateau_fall_stddevs` standard
    errors of the difference), lies `plateau_min_relative_drop` below the
    highest window mean since the peak, and no loss in the window exceeds
    that highest mean. The
    plateau's losses (those that leave the window from then on, after the
    plateau's own window) are its reference. There is no other plateau
    until the next peak.
  * A **peak** (the data changed), after a plateau: at least
    `peak_min_high` losses of the window exceed the `peak_quantile` of the
    plateau's losses, and `m` is at least `1 + peak_min_relative_rise`
    times their mean. The start of the stream counts as a peak.

  Every default rule uses ranks and ratios of the stream's own losses, so
  the same values serve 2-class and 10-class cross-entropy, heavy-tailed
  small-batch losses, or a regression loss in any unit. The paper's
  absolute thresholds can be added as extra conditions. `update` returns
  `"peak"`, `"plateau"` or None. Plain Python and NumPy: no TensorFlow.

  Example:

  ```python
  window = LossWindow()
  for step, loss in enumerate(losses):
    event = window.update(loss)  # "peak", "plateau" or None
  print(window.peaks, window.plateaus)  # the steps of each
  ```

  Args:
    window_size: number of recent losses in the window.
    peak_quantile: a loss above this quantile of the plateau's losses is
      high ...
    peak_min_high: ... and a peak has at least this many high losses.
    peak_min_relative_rise: a peak's window mean is at least `1 + this`
      times the plateau's mean.
    plateau_fall_stddevs: a plateau's window mean fell from the previous
      window's by at most this many standard errors (None: not asked).
    plateau_min_relative_drop: a plateau's window mean lies this fraction
      below the highest window mean since the peak.
    peak_stddevs: optional, the paper's rule: a peak's window mean also
      exceeds the plateau's mean by this many of its standard deviations.
    peak_min_rise: optional absolute floor of a peak's rise above the
      plateau's mean.
    plateau_mean_below: optional absolute bound: a plateau's window mean is
      below this (the paper's rule).
    plateau_variance_below: optional absolute bound on a plateau's window
      variance (the paper's rule).

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, window_size=DEFAULT_WINDOW_SIZE,
               peak_quantile=DEFAULT_PEAK_QUANTILE,
               peak_min_high=DEFAULT_PEAK_MIN_HIGH,
               peak_min_relative_rise=DEFAULT_PEAK_MIN_RELATIVE_RISE,
               plateau_fall_stddevs=DEFAULT_PLATEAU_FALL_STDDEVS,
               plateau_min_relative_drop=DEFAULT_PLATEAU_MIN_RELATIVE_DROP,
               peak_stddevs=None, peak_min_rise=None,
               plateau_mean_below=None, plateau_variance_below=None):
    self.window_size = _checks.positive_int("window_size", window_size)
    self.peak_quantile = _checks.fraction("peak_quantile", peak_quantile)
    self.peak_min_high = _checks.positive_int("peak_min_high", peak_min_high)
    if self.peak_min_high > self.window_size:
      raise ValueError(
          "Invalid value for argument `peak_min_high`. Expected at most "
          f"window_size={self.window_size}. Received: "
          f"peak_min_high={peak_min_high!r}")
    self.peak_min_relative_rise = _checks.non_negative(
        "peak_min_relative_rise", peak_min_relative_rise)
    self.plateau_fall_stddevs = _optional("plateau_fall_stddevs",
                                          plateau_fall_stddevs)
    self.plateau_min_relative_drop = _checks.fraction(
        "plateau_min_relative_drop", plateau_min_relative_drop)
    self.peak_stddevs = _optional("peak_stddevs", peak_stddevs)
    self.peak_min_rise = _optional("peak_min_rise", peak_min_rise)
    self.plateau_mean_below = _optional("plateau_mean_below",
                                        plateau_mean_below)
    self.plateau_variance_below = _optional("plateau_variance_below",
                                            plateau_variance_below)
    self.reset()

  def reset(self):
    """Forgets every loss seen: a fresh stream."""
    self.losses = []
    self.step = 0
    # The stream's start is a rise: the first plateau follows it.
    self.after_peak = True
    self.highest = None  # Highest window mean since the peak.
    self.plateau_losses = []
    self.plateau_length = 0
    self.peaks = [0]
    self.plateaus = []

  @property
  def full(self):
    return len(self.losses) >= self.window_size

  def _window(self):
    return np.asarray(self.losses[-self.window_size:], dtype="float64")

  @property
  def mean(self):
    """The window's mean loss (NaN while empty)."""
    return float(np.mean(self._window())) if self.losses else float("nan")

  @property
  def variance(self):
    """The window's variance of the loss (NaN while empty)."""
    return float(np.var(self._window())) if self.losses else float("nan")

  @property
  def plateau_mean(self):
    """Mean of the last plateau's losses (None before the first)."""
    if not self.plateau_losses:
      return None
    return float(np.mean(self.plateau_losses))

  @property
  def high_level(self):
    """A loss above this is high: the `peak_quantile` of the plateau's
    losses (None before the first plateau)."""
    if not self.plateau_losses:
      return None
    chance = (1 - self.peak_quantile) * min(
        1.0, np.sqrt(_TIGHTEN_AFTER / self.plateau_length))
    return float(np.quantile(self.plateau_losses, 1 - chance))

  @property
  def peak_level(self):
    """The lowest window mean a peak can have (None before the first
    plateau): the relative rise and the optional absolute rules."""
    if not self.plateau_losses:
      return None
    level = self.plateau_mean
    rises = [self.peak_min_relative_rise * level]
    if self.peak_stddevs is not None:
      rises.append(self.peak_stddevs * float(np.std(self.plateau_losses)))
    if self.peak_min_rise is not None:
      rises.append(self.peak_min_rise)
    return level + max(rises)

  def update(self, loss):
    """Adds one loss (the next step's); returns `"peak"`, `"plateau"` or None.

    Args:
      loss: a finite number, e.g. the mean loss of the incoming batch.

    Raises:
      ValueError: if `loss` is not a finite number (nothing changes).
    """
    try:
      value = float(loss)
    except (TypeError, ValueError):
      value = float("nan")
    if not np.isfinite(value):
      raise ValueError(
          "Invalid value for argument `loss`. Expected a finite number. "
          f"Received: loss={loss!r}")
    self.step += 1
    self.losses.append(value)
    left = (self.losses[-self.window_size - 1]
            if len(self.losses) > self.window_size else None)
    del self.losses[:-2 * self.window_size]
    if not self.full:
      return None
    mean = self.mean
    if not self.after_peak:
      if self._is_peak(mean):
        self.after_peak = True
        self.highest = mean
        self.peaks.append(self.step)
        return "peak"
      # The window's losses join the reference as they leave it, so that
      # a rise under way never lifts the level it is judged against.
      if self.step - self.plateaus[-1] > self.window_size:
        # Earlier leavers were in the plateau's own window, counted then.
        self.plateau_losses.append(left)
        self.plateau_length += 1
        del self.plateau_losses[:-_HISTORY]
      return None
    self.highest = mean if self.highest is None else max(self.highest, mean)
    if self._is_plateau(mean):
      self.after_peak = False
      self.plateau_losses = [float(v) for v in self._window()]
      self.plateau_length = len(self.plateau_losses)
      self.plateaus.append(self.step)
      return "plateau"
    return None

  def _is_peak(self, mean):
    high = int(np.sum(self._window() > self.high_level))
    return high >= self.peak_min_high and mean > self.peak_level

  def _is_plateau(self, mean):
    window = self._window()
    if self.step - self.peaks[-1] < 2 * self.window_size:
      return False  # The previous window would hold losses before the peak.
    if (mean > (1 - self.plateau_min_relative_drop) * self.highest
        or window.max() > self.highest):
      return False
    if (self.plateau_mean_below is not None
        and not mean < self.plateau_mean_below):
      return False
    if (self.plateau_variance_below is not None
        and not self.variance < self.plateau_variance_below):
      return False
    if self.plateau_fall_stddevs is None:
      return True
    previous = np.asarray(self.losses[:self.window_size], dtype="float64")
    error = np.sqrt((previous.var() + window.var()) / self.window_size)
    return previous.mean() - mean <= self.plateau_fall_stddevs * error

  def get_config(self):
    return {"window_size": self.window_size,
            "peak_quantile": self.peak_quantile,
            "peak_min_high": self.peak_min_high,
            "peak_min_relative_rise": self.peak_min_relative_rise,
            "plateau_fall_stddevs": self.plateau_fall_stddevs,
            "plateau_min_relative_drop": self.plateau_min_relative_drop,
            "peak_stddevs": self.peak_stddevs,
            "peak_min_rise": self.peak_min_rise,
            "plateau_mean_below": self.plateau_mean_below,
            "plateau_variance_below": self.plateau_variance_below}

  _STATE = ("losses", "step", "after_peak", "highest", "plateau_losses",
            "plateau_length", "peaks", "plateaus")

  def get_state(self):
    """The detector's state as plain (JSON-serialisable) values."""
    return {"losses": list(self.losses), "step": self.step,
            "after_peak": self.after_peak, "highest": self.highest,
            "plateau_losses": list(self.plateau_losses),
            "plateau_length": self.plateau_length,
            "peaks": list(self.peaks), "plateaus": list(self.plateaus)}

  def set_state(self, state):
    """Restores what `get_state` returned.

    Raises:
      ValueError: if `state` lacks a key or holds more losses than the
        detector keeps (nothing changes).
    """
    missing = [k for k in self._STATE if k not in state]
    if missing or len(state["losses"]) > 2 * self.window_size:
      raise ValueError(
          "Invalid value for argument `state`. Expected the dict of "
          f"LossWindow.get_state() for a window of {self.window_size}. "
          f"Received: missing {missing}, "
          f"{len(state.get('losses', []))} losses")
    self.losses = [float(v) for v in state["losses"]]
    self.step = int(state["step"])
    self.after_peak = bool(state["after_peak"])
    self.highest = (None if state["highest"] is None
                    else float(state["highest"]))
    self.plateau_losses = [float(v) for v in state["plateau_losses"]]
    self.plateau_length = int(state["plateau_length"])
    self.peaks = [int(s) for s in state["peaks"]]
    self.plateaus = [int(s) for s in state["plateaus"]]
