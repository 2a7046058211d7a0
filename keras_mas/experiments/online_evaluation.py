"""Online evaluation of a stream: prequential and anytime average accuracy.

A task-free learner is deployed while it learns, so the accuracy matrix at
the hidden boundaries (what `run_stream` scores) is not all a user wants to
see. Two curves over the stream:

* the **prequential** accuracy: each incoming batch predicted before it is
  trained on (test-then-train), averaged over the last stretch of batches;
* the **anytime average accuracy**: every few batches, the test accuracy on
  each hidden task seen so far, and their mean: forgetting as it happens,
  not only at the boundaries.

Both go to TensorBoard (`stream/prequential_accuracy`,
`stream/anytime_average_accuracy`) and to a PNG beside `results.json`, with
the true changes and the consolidations marked.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_mas.experiments import evaluation as evaluation_lib

__all__ = ["AnytimeAccuracy", "EachIncomingBatch", "default_every",
           "plot_stream"]

# Points along the stream at which the anytime accuracy is measured.
_POINTS = 50
# Test samples per task for the anytime accuracy: enough for a curve
# (±2 % at 500), few enough to measure 50 times along a stream.
DEFAULT_SAMPLES = 500


def default_every(num_steps):
  """Measure every this many incoming batches: about 50 points a stream."""
  return max(1, int(num_steps) // _POINTS)


class EachIncomingBatch(keras.callbacks.Callback):
  """Calls `on_step(step)` once per incoming batch, after `task_free`.

  With `updates_per_batch > 1` Keras calls back after every train step;
  this fires once per incoming batch, with `task_free.step` (a
  `TaskFreeConsolidation` placed before it in the callbacks).
  """

  def __init__(self, task_free):
    super().__init__()
    self.task_free = task_free
    self._last = None

  def on_train_begin(self, logs=None):
    self._last = self.task_free.step  # Resumed: that step is done.

  def on_train_batch_end(self, batch, logs=None):
    step = self.task_free.step
    if step != self._last:
      self._last = step
      self.on_step(step)

  def on_step(self, step):
    raise NotImplementedError


def _subsampled(task, samples):
  if task.streaming:
    return dataclasses.replace(task, test_data=task.test_data.take(samples))
  return dataclasses.replace(task, x_test=task.x_test[:samples],
                             y_test=task.y_test[:samples])


class AnytimeAccuracy(EachIncomingBatch):
  """Every `every` incoming batches and at the last: accuracy on each hidden
  task seen so far (its first `samples` test samples), and the prequential
  accuracy of the batches since the previous point.

  Attributes:
    records: one dict per point: `step`, `tasks_seen`, `accuracies` (per
      seen task), `anytime_average_accuracy` (their mean) and
      `prequential_accuracy` (NaN without an accuracy metric).
  """

  def __init__(self, task_free, sequence, boundaries, every=None,
               samples=DEFAULT_SAMPLES, batch_size=256, log_dir=None):
    super().__init__(task_free)
    self.boundaries = list(boundaries)
    self.num_steps = self.boundaries[-1]
    self.every = every or default_every(self.num_steps)
    self.sequence = dataclasses.replace(
        sequence, tasks=[_subsampled(t, samples) for t in sequence.tasks])
    self.batch_size = batch_size
    self.log_dir = log_dir
    self._writer = None
    self.records = []

  def on_step(self, step):
    if step % self.every and step != self.num_steps:
      return
    seen = 1 + sum(b < step for b in self.boundaries[:-1])
    sequence = dataclasses.replace(self.sequence,
                                   tasks=self.sequence.tasks[:seen])
    accuracies = evaluation_lib.task_accuracies(
        self.model, sequence, self.batch_size, trained=seen - 1)
    since = self.records[-1]["step"] if self.records else 0
    window = self.task_free.online_correct[since:step]
    counted = [(c, n) for c, n in window if c is not None]
    prequential = (sum(c for c, _ in counted) / sum(n for _, n in counted)
                   if counted and len(counted) == len(window) else np.nan)
    record = {"step": int(step), "tasks_seen": int(seen),
              "accuracies": [float(a) for a in accuracies],
              "anytime_average_accuracy": float(np.mean(accuracies)),
              "prequential_accuracy": float(prequential)}
    self.records.append(record)
    if self.log_dir is not None:
      if self._writer is None:
        self._writer = tf.summary.create_file_writer(self.log_dir)
      with self._writer.as_default(step=step):
        tf.summary.scalar("stream/anytime_average_accuracy",
                          record["anytime_average_accuracy"])
        if np.isfinite(prequential):
          tf.summary.scalar("stream/prequential_accuracy", prequential)
      self._writer.flush()


def plot_stream(results, path):
  """Draws the prequential and anytime average accuracy of one stream run.

  Args:
    results: what `run_stream` returns (its `online` records, `boundaries`
      and `consolidations`).
    path: the PNG to write.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  records = results["online"]
  steps = [r["step"] for r in records]
  figure, axis = plt.subplots(figsize=(8, 4), dpi=110)
  axis.plot(steps, [r["prequential_accuracy"] for r in records],
            color="tab:blue", label="prequential (each batch before training)")
  axis.plot(steps, [r["anytime_average_accuracy"] for r in records],
            color="tab:green", label="anytime average (tasks seen so far)")
  for i, boundary in enumerate(results["boundaries"][:-1]):
    axis.axvline(boundary, color="0.6", linestyle=":",
                 label="true change" if i == 0 else None)
  for i, step in enumerate(results["consolidations"]):
    axis.axvline(step, color="tab:red", linewidth=1,
                 label="consolidation" if i == 0 else None)
  axis.set_xlim(0, results["boundaries"][-1])
  axis.set_ylim(0, 1.02)
  axis.set_xlabel("incoming batch")
  axis.set_ylabel("accuracy")
  axis.set_title(f"{results['method']} on {results['dataset']} "
                 f"({results['recipe']}, {results['scenario']}-incremental)")
  # Below the axes: inside, it would hide the dips after each change.
  axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4,
              fontsize=8, frameon=False)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
