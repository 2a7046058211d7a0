"""Task-free MAS: learn a stream whose distribution drifts, with no task ids.

Aljundi, Kelchtermans and Tuytelaars, "Task-Free Continual Learning", CVPR
2019. Nobody says when a task ends. The model learns online from the
stream's small batches, each rehearsed with a small buffer of the hardest
recent samples (`HardBuffer`). A sliding window of recent losses
(`LossWindow`) tells when to consolidate: a rise of the window's mean well
above the last plateau is a *peak* (the distribution changed); after a peak,
a window whose mean and variance both fall below thresholds is a *plateau*
(something new has been learned). At each plateau, MAS importance is
measured on the buffer, accumulated into Ω, and θ* ← θ
(`MASModel.consolidate`).

Every piece keeps its state as plain values (`get_state` / `set_state`) so
that a checkpoint can hold it beside the model.
"""

import numpy as np

__all__ = ["HardBuffer", "LossWindow"]

# Defaults, for cross-entropy losses of a classifier learning online from
# batches of ~10 samples (they work on the bundled digits streams).
# Losses kept in the sliding window: enough to smooth one noisy small batch,
# few enough to react within a task's first dozen batches.
DEFAULT_WINDOW_SIZE = 5
# A plateau's window mean must be below this (cross-entropy ≈ 0.3: ~90 % of
# the probability on the right class): the stretch has been learned.
DEFAULT_PLATEAU_MEAN_BELOW = 0.3
# ... and its variance below this: the loss has settled, not just dipped.
DEFAULT_PLATEAU_VARIANCE_BELOW = 0.02
# A peak: the window mean exceeds the last plateau's mean by this many of
# the plateau's standard deviations (the paper's rule, with 1) ...
DEFAULT_PEAK_STDDEVS = 1.0
# ... and by at least this much: a plateau with a tiny variance would
# otherwise call every noisy batch a peak.
DEFAULT_PEAK_MIN_RISE = 0.2
# Samples kept for rehearsal and importance.
DEFAULT_BUFFER_SIZE = 50


def _check_positive_int(name, value):
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a positive integer. "
        f"Received: {name}={value!r}")
  return int(value)


def _check_non_negative(name, value):
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, bool) or not np.isfinite(number) or number < 0:
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected a finite number >= 0. "
        f"Received: {name}={value!r}")
  return number


class LossWindow:
  """Detects peaks and plateaus in a stream of losses (the paper's trigger).

  Keep the last `window_size` losses. Once the window is full:

  * a **peak** is a window mean above `plateau mean + max(peak_stddevs ·
    plateau std, peak_min_rise)` of the last plateau: the loss rose, the
    data changed. The start of the stream counts as a peak.
  * a **plateau** is, after a peak, a window whose mean is below
    `plateau_mean_below` and whose variance is below
    `plateau_variance_below`: the new data has been learned. The window's
    mean and variance become the reference for the next peak; there is no
    other plateau until the next peak.

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
    self.window_size = _check_positive_int("window_size", window_size)
    self.plateau_mean_below = _check_non_negative("plateau_mean_below",
                                                  plateau_mean_below)
    self.plateau_variance_below = _check_non_negative(
        "plateau_variance_below", plateau_variance_below)
    self.peak_stddevs = _check_non_negative("peak_stddevs", peak_stddevs)
    self.peak_min_rise = _check_non_negative("peak_min_rise", peak_min_rise)
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
      return None
    if mean < self.plateau_mean_below and variance < self.plateau_variance_below:
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


class HardBuffer:
  """The `capacity` hardest recent samples: the highest losses seen last.

  After every step the buffer's samples and the incoming batch compete on
  their current losses (measured on the same weights, just before training
  on them); the `capacity` highest stay. A sample the model has learned
  leaves; one it still gets wrong stays and is rehearsed again. On equal
  losses the newer sample wins.

  Example:

  ```python
  buffer = HardBuffer(50)
  x_all, y_all = buffer.with_batch(x, y)
  losses = per_sample_loss(y_all, model.predict_on_batch(x_all))
  buffer.update(x_all, y_all, losses)
  ```

  Args:
    capacity: the most samples kept.

  Raises:
    ValueError: if `capacity` is not a positive integer.
  """

  def __init__(self, capacity=DEFAULT_BUFFER_SIZE):
    self.capacity = _check_positive_int("capacity", capacity)
    self.inputs = None
    self.labels = None
    self.losses = None

  def __len__(self):
    return 0 if self.inputs is None else len(self.inputs)

  def with_batch(self, x, y):
    """The incoming batch followed by the buffer's samples, `(x, y)`."""
    x, y = np.asarray(x), np.asarray(y)
    if not len(self):
      return x, y
    if x.shape[1:] != self.inputs.shape[1:]:
      raise ValueError(
          "Invalid value for argument `x`. Expected inputs of the buffer's "
          f"shape {self.inputs.shape[1:]}. Received: {x.shape[1:]}")
    return (np.concatenate([x, self.inputs.astype(x.dtype, copy=False)]),
            np.concatenate([y, self.labels.astype(y.dtype, copy=False)]))

  def update(self, x, y, losses):
    """Keeps the `capacity` samples of `(x, y)` with the highest `losses`.

    `(x, y)` is what `with_batch` returned (the batch first, so that it
    wins ties), `losses` one value per sample.

    Raises:
      ValueError: for lengths that differ or non-finite losses (nothing
        changes).
    """
    x, y = np.asarray(x), np.asarray(y)
    losses = np.asarray(losses, dtype="float64").reshape(-1)
    if not len(x) == len(y) == len(losses):
      raise ValueError(
          "Invalid value for argument `losses`. Expected one per sample of "
          f"`x` and `y`. Received: {len(x)} inputs, {len(y)} labels, "
          f"{len(losses)} losses")
    if not np.all(np.isfinite(losses)):
      raise ValueError(
          "Invalid value for argument `losses`. Expected finite losses. "
          f"Received: {int(np.sum(~np.isfinite(losses)))} NaN or infinite")
    keep = np.argsort(-losses, kind="stable")[:self.capacity]
    self.inputs, self.labels, self.losses = x[keep], y[keep], losses[keep]

  def get_state(self):
    """`{"inputs", "labels", "losses"}` as NumPy arrays (None when empty);
    `numpy.savez` writes them."""
    return {"inputs": self.inputs, "labels": self.labels,
            "losses": self.losses}

  def set_state(self, state):
    """Restores what `get_state` returned.

    Raises:
      ValueError: for a state larger than the capacity or of mismatched
        lengths (nothing changes).
    """
    if state.get("inputs") is None:
      self.inputs = self.labels = self.losses = None
      return
    x, y = np.asarray(state["inputs"]), np.asarray(state["labels"])
    losses = np.asarray(state["losses"], dtype="float64")
    if not len(x) == len(y) == len(losses) or len(x) > self.capacity:
      raise ValueError(
          "Invalid value for argument `state`. Expected at most "
          f"{self.capacity} samples with one label and loss each. Received: "
          f"{len(x)} inputs, {len(y)} labels, {len(losses)} losses")
    self.inputs, self.labels, self.losses = x, y, losses
