"""LossWindow: peaks and plateaus in a stream of losses.

The trigger of task-free MAS (Aljundi, Kelchtermans and Tuytelaars, CVPR
2019): a rise of the recent losses well above the last plateau is a *peak*
(the data changed); after a peak, recent losses low and settled are a
*plateau* (it has been learned), the moment to consolidate.
"""

import numpy as np

from keras_mas.task_free import _checks

__all__ = ["DEFAULT_PEAK_MIN_RISE", "DEFAULT_PEAK_STDDEVS",
           "DEFAULT_PLATEAU_MEAN_BELOW", "DEFAULT_PLATEAU_VARIANCE_BELOW",
           "DEFAULT_WINDOW_SIZE", "LossWindow"]
# Defaults, for cross-entropy losses of a classifier learning online from
# batches of ~10 samples (they work on the bundled digits streams).
# Losses kept in the sliding window: enough to smooth one noisy small batch,
# few enough to react within a task's first dozen batches.
DEFAULT_WINDOW_SIZE = 5
# A plateau's window mean must be below this (cross-entropy 0.2: ~82 % of
# the probability on the right class): the stretch has been learned.
DEFAULT_PLATEAU_MEAN_BELOW = 0.2
# ... and its variance below this: the loss has settled, not just dipped.
DEFAULT_PLATEAU_VARIANCE_BELOW = 0.02
# A peak: the window mean exceeds the last plateau's mean by this many of
# the plateau's standard deviations (the paper's rule, with 1) ...
DEFAULT_PEAK_STDDEVS = 1.0
# ... and by at least this much: a plateau with a tiny variance would
# otherwise call every noisy batch a peak.
DEFAULT_PEAK_MIN_RISE = 0.15


class LossWindow:
  """Detects peaks and plateaus in a stream of losses (the paper's trigger).

  Keep the last `window_size` losses. Once the window is full:

  * a **peak** is a window mean above `plateau mean + max(peak_stddevs ·
    plateau std, peak_min_rise)` of the last plateau: the loss rose, the
    data changed. The start of the stream counts as a peak.
  * a **plateau** is, after a peak, a window whose mean is below
    `plateau_mean_below` and whose variance is below
    `plateau_variance_below`: the new data has been learned. The window's
    mean and variance become the reference for the next peak (and follow
    the window down while its mean keeps falling: a loss still settling
    when the plateau is declared would otherwise hide the next rise);
    there is no other plateau until the next peak.

  `update` returns `"peak"`, `"plateau"` or None; the caller consolidates on
  `"plateau"`. Plain Python and NumPy: no TensorFlow.

  Example:

  ```python
  window = LossWindow()
  for step, loss in enumerate(losses):
    if window.update(loss) == "plateau":
      model.consolidate(buffer.inputs)
  ```

  Args:
    window_size: number of recent losses in the window.
    plateau_mean_below: a plateau's window mean is below this.
    plateau_variance_below: a plateau's window variance is below this.
    peak_stddevs: a peak rises this many plateau standard deviations above
      the last plateau's mean ...
    peak_min_rise: ... and at least this much above it.

  Raises:
    ValueError: naming the argument, for a value out of range.
  """

  def __init__(self, window_size=DEFAULT_WINDOW_SIZE,
               plateau_mean_below=DEFAULT_PLATEAU_MEAN_BELOW,
               plateau_variance_below=DEFAULT_PLATEAU_VARIANCE_BELOW,
               peak_stddevs=DEFAULT_PEAK_STDDEVS,
               peak_min_rise=DEFAULT_PEAK_MIN_RISE):
    self.window_size = _checks.positive_int("window_size", window_size)
    self.plateau_mean_below = _checks.non_negative("plateau_mean_below",
                                                  plateau_mean_below)
    self.plateau_variance_below = _checks.non_negative(
        "plateau_variance_below", plateau_variance_below)
    self.peak_stddevs = _checks.non_negative("peak_stddevs", peak_stddevs)
    self.peak_min_rise = _checks.non_negative("peak_min_rise", peak_min_rise)
    self.reset()

  def reset(self):
    """Forgets every loss seen: a fresh stream."""
    self.losses = []
    self.step = 0
    # The stream's start is a rise: the first plateau consolidates.
    self.after_peak = True
    self.plateau_mean = None
    self.plateau_variance = None
    self.peaks = [0]
    self.plateaus = []

  @property
  def full(self):
    return len(self.losses) == self.window_size

  @property
  def mean(self):
    """The window's mean loss (NaN while empty)."""
    return float(np.mean(self.losses)) if self.losses else float("nan")

  @property
  def variance(self):
    """The window's variance of the loss (NaN while empty)."""
    return float(np.var(self.losses)) if self.losses else float("nan")

  @property
  def peak_level(self):
    """The window mean above which a peak is declared (None before the
    first plateau, when the stream's start is the peak)."""
    if self.plateau_mean is None:
      return None
    rise = max(self.peak_stddevs * float(np.sqrt(self.plateau_variance)),
               self.peak_min_rise)
    return self.plateau_mean + rise

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
    del self.losses[:-self.window_size]
    if not self.full:
      return None
    mean, variance = self.mean, self.variance
    if not self.after_peak:
      if mean > self.peak_level:
        self.after_peak = True
        self.peaks.append(self.step)
        return "peak"
      if mean < self.plateau_mean:
        # Still settling: the plateau's level follows the window down.
        self.plateau_mean, self.plateau_variance = mean, variance
      return None
    if (mean < self.plateau_mean_below
        and variance < self.plateau_variance_below):
      self.after_peak = False
      self.plateau_mean, self.plateau_variance = mean, variance
      self.plateaus.append(self.step)
      return "plateau"
    return None

  def get_config(self):
    return {"window_size": self.window_size,
            "plateau_mean_below": self.plateau_mean_below,
            "plateau_variance_below": self.plateau_variance_below,
            "peak_stddevs": self.peak_stddevs,
            "peak_min_rise": self.peak_min_rise}

  def get_state(self):
    """The detector's state as plain (JSON-serialisable) values."""
    return {"losses": list(self.losses), "step": self.step,
            "after_peak": self.after_peak,
            "plateau_mean": self.plateau_mean,
            "plateau_variance": self.plateau_variance,
            "peaks": list(self.peaks), "plateaus": list(self.plateaus)}

  def set_state(self, state):
    """Restores what `get_state` returned.

    Raises:
      ValueError: if `state` lacks a key or holds more losses than the
        window (nothing changes).
    """
    keys = ("losses", "step", "after_peak", "plateau_mean",
            "plateau_variance", "peaks", "plateaus")
    missing = [k for k in keys if k not in state]
    if missing or len(state["losses"]) > self.window_size:
      raise ValueError(
          "Invalid value for argument `state`. Expected the dict of "
          f"LossWindow.get_state() for a window of {self.window_size}. "
          f"Received: missing {missing}, "
          f"{len(state.get('losses', []))} losses")
    self.losses = [float(v) for v in state["losses"]]
    self.step = int(state["step"])
    self.after_peak = bool(state["after_peak"])
    self.plateau_mean = (None if state["plateau_mean"] is None
                         else float(state["plateau_mean"]))
    self.plateau_variance = (None if state["plateau_variance"] is None
                             else float(state["plateau_variance"]))
    self.peaks = [int(s) for s in state["peaks"]]
    self.plateaus = [int(s) for s in state["plateaus"]]

