"""Loss, accuracy and output selection restricted to one task's outputs.

A model for a task sequence has `TaskSequence.num_outputs` logits. Task `t`
trains and is scored on outputs `[start, stop)` only (its head, the classes
seen so far, or the shared head, by scenario) with labels shifted by
`label_offset`. Outputs outside the slice get no gradient from the task loss.
"""

import keras
from keras import ops

__all__ = ["DistillationLoss", "MixedTaskLoss", "OutputSlice", "TaskAccuracy",
           "TaskLoss"]


def _labels(y_true):
  """The class label: `y_true` itself, or its first column when it carries
  more (distillation targets)."""
  if len(y_true.shape) == 2 and y_true.shape[-1] not in (None, 1):
    y_true = y_true[:, 0]
  return ops.cast(ops.reshape(y_true, (-1,)), "int32")


@keras.saving.register_keras_serializable(package="keras_mas")
class OutputSlice:
  """`outputs[:, start:stop]`; equal slices compare equal (one trace each)."""

  def __init__(self, start, stop):
    self.start, self.stop = int(start), int(stop)

  def __call__(self, outputs):
    return outputs[:, self.start:self.stop]

  def __eq__(self, other):
    return (isinstance(other, OutputSlice)
            and (self.start, self.stop) == (other.start, other.stop))

  def __hash__(self):
    return hash((OutputSlice, self.start, self.stop))

  def get_config(self):
    return {"start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package="keras_mas")
class TaskLoss(keras.losses.Loss):
  """Sparse categorical cross-entropy on logits `[start, stop)`.

  Args:
    start: first output of the task.
    stop: one past its last output.
    label_offset: added to the task's local labels `0..C−1`.
  """

  def __init__(self, start, stop, label_offset=0, name="task_loss", **kwargs):
    super().__init__(name=name, **kwargs)
    self.start, self.stop, self.label_offset = int(start), int(stop), int(
        label_offset)

  def call(self, y_true, y_pred):
    logits = y_pred[:, self.start:self.stop]
    labels = ops.cast(ops.reshape(y_true, (-1,)), "int32") + self.label_offset
    return keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)

  def get_config(self):
    config = super().get_config()
    config.update(start=self.start, stop=self.stop,
                  label_offset=self.label_offset)
    return config


@keras.saving.register_keras_serializable(package="keras_mas")
class TaskAccuracy(keras.metrics.MeanMetricWrapper):
  """Accuracy of the argmax over logits `[start, stop)`."""

  def __init__(self, start, stop, label_offset=0, name="accuracy", **kwargs):
    self.start, self.stop, self.label_offset = int(start), int(stop), int(
        label_offset)
    super().__init__(fn=self._correct, name=name, **kwargs)

  def _correct(self, y_true, y_pred):
    predicted = ops.argmax(y_pred[:, self.start:self.stop], axis=-1)
    labels = _labels(y_true) + self.label_offset
    return ops.cast(ops.equal(ops.cast(predicted, "int32"), labels), "float32")

  def get_config(self):
    return {"start": self.start, "stop": self.stop,
            "label_offset": self.label_offset, "name": self.name,
            "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_mas")
class DistillationLoss(TaskLoss):
  """Learning without Forgetting: the task's loss plus distillation.

  `y_true` is `[label, old logits...]`: the label of the task, then the
  logits of outputs `[old_start, old_stop)` recorded before the task began.
  The loss adds `weight · T² · KL(softmax(old/T) ‖ softmax(new/T))` over
  those outputs (Hinton et al. 2015; Li & Hoiem 2017).
  """

  def __init__(self, start, stop, label_offset=0, old_start=0, old_stop=0,
               temperature=2.0, weight=1.0, name="distillation_loss",
               **kwargs):
    super().__init__(start, stop, label_offset, name=name, **kwargs)
    self.old_start, self.old_stop = int(old_start), int(old_stop)
    self.temperature, self.weight = float(temperature), float(weight)

  def call(self, y_true, y_pred):
    task = super().call(y_true[:, 0], y_pred)
    t = self.temperature
    old = ops.softmax(ops.cast(y_true[:, 1:], "float32") / t, axis=-1)
    new = ops.log_softmax(
        ops.cast(y_pred[:, self.old_start:self.old_stop], "float32") / t,
        axis=-1)
    kl = ops.sum(old * (ops.log(ops.maximum(old, 1e-12)) - new), axis=-1)
    return task + self.weight * t * t * kl

  def get_config(self):
    config = super().get_config()
    config.update(old_start=self.old_start, old_stop=self.old_stop,
                  temperature=self.temperature, weight=self.weight)
    return config


@keras.saving.register_keras_serializable(package="keras_mas")
class MixedTaskLoss(keras.losses.Loss):
  """Cross-entropy for samples of different tasks in one batch (joint).

  `y_true` rows are `[target output, start, stop]`: each sample's logits
  outside its task's `[start, stop)` are masked out before the softmax.
  """

  def __init__(self, name="mixed_task_loss", **kwargs):
    super().__init__(name=name, **kwargs)

  def call(self, y_true, y_pred):
    y_true = ops.cast(y_true, "int32")
    positions = ops.arange(ops.shape(y_pred)[-1])[None, :]
    inside = ops.logical_and(positions >= y_true[:, 1:2],
                             positions < y_true[:, 2:3])
    logits = ops.where(inside, ops.cast(y_pred, "float32"), -1e9)
    return keras.losses.sparse_categorical_crossentropy(
        y_true[:, 0], logits, from_logits=True)
