"""What a run of tasks has measured so far: the state its checkpoints keep.

Both runners (`sequential.run_sequence`, `language.run_corpora`) record the
same things after each task: a row of the task matrix, the timings, and
the measure on the data a starting model was deployed on; a resume reads
them back. They differ in what the matrix measures (accuracy, or a
language model's next-token loss), named by a subclass's keys.
"""

import dataclasses

import numpy as np

__all__ = ["Progress"]


@dataclasses.dataclass
class Progress:
  """A run's measurements so far.

  Attributes:
    first_task: the task to train next.
    matrix: `T×T`, `matrix[i][j]` measured on task `j` after task `i`
      (NaN for rows not yet trained).
    baseline: the measure on each task before any training.
    timings: one dict of seconds per task trained.
    deployed: the measure on the importance data before the first task and
      after each; None without importance data.
    resumes: where the run was resumed, one dict each time.
  """
  # The state's keys (`state()`, `from_state`).
  MATRIX = "accuracy_matrix"
  DEPLOYED = "importance_data_accuracy"

  first_task: int
  matrix: np.ndarray
  baseline: list
  timings: list
  deployed: list = None
  resumes: list = dataclasses.field(default_factory=list)

  @classmethod
  def new(cls, baseline, deployed=None):
    """A run about to train its first task."""
    size = len(baseline)
    return cls(0, np.full((size, size), np.nan), list(baseline), [], deployed)

  @classmethod
  def from_state(cls, k, state):
    """The progress after task `k`, from a checkpoint's state."""
    return cls(k + 1, np.array(state[cls.MATRIX], dtype="float64"),
               state["baseline"], state["timings"], state.get(cls.DEPLOYED),
               list(state.get("resumes", [])))

  def record(self, k, deployed=None, **timings):
    """Task `k`'s timings, and the measure on the deployed data after it."""
    self.timings.append({"task": k, **timings})
    if self.deployed is not None and deployed is not None:
      self.deployed.append(deployed)

  def state(self):
    """What a checkpoint keeps (JSON)."""
    return {self.MATRIX: self.matrix.tolist(), "baseline": self.baseline,
            "timings": self.timings, self.DEPLOYED: self.deployed,
            "resumes": self.resumes}
