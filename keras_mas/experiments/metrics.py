"""Continual-learning metrics over an accuracy matrix.

`R[i][j]` is the test accuracy on task `j` after training tasks `0..i`; the
matrix is `T×T` (entries for tasks not yet trained are measured too: they
feed forward transfer).
"""

import numpy as np

__all__ = [
    "average_accuracy", "backward_transfer", "forward_transfer", "forgetting",
    "summarize",
]


def _matrix(r):
  r = np.asarray(r, dtype="float64")
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
    raise ValueError(
        "Invalid value for argument `accuracy_matrix`. Expected a square T×T "
        f"matrix. Received: shape {r.shape}")
  return r


def average_accuracy(r):
  """`ACC = mean_j R[T−1][j]`."""
  r = _matrix(r)
  return float(r[-1].mean())


def backward_transfer(r):
  """`BWT = mean_{j<T−1} (R[T−1][j] − R[j][j])` (Lopez-Paz & Ranzato 2017)."""
  r = _matrix(r)
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forward_transfer(r, baseline):
  """`FWT = mean_{j≥1} (R[j−1][j] − b_j)`.

  `b_j` is the untrained model's accuracy on task `j`.
  """
  r = _matrix(r)
  b = np.asarray(baseline, dtype="float64")
  if b.shape != (len(r),):
    raise ValueError(
        "Invalid value for argument `baseline`. Expected one accuracy per "
        f"task, shape ({len(r)},). Received: shape {b.shape}")
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(r):
  """`mean_{j<T−1} (max_{l<T−1} R[l][j] − R[T−1][j])` (Chaudhry et al. 2018)."""
  r = _matrix(r)
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([r[:t - 1, j].max() - r[-1, j] for j in range(t - 1)]))


def summarize(r, baseline):
  """All four metrics of the first `len(r)` tasks, as a dict of floats."""
  return {
      "acc": average_accuracy(r),
      "bwt": backward_transfer(r),
      "fwt": forward_transfer(r, baseline),
      "forgetting": forgetting(r),
  }
