"""Loss, accuracy and output selection restricted to one task's outputs.

A model for a task sequence has `TaskSequence.num_outputs` logits. Task `t`
trains and is scored on outputs `[start, stop)` only (its head, the classes
seen so far, or the shared head, by scenario) with labels shifted by
`label_offset`. Outputs outside the slice get no gradient from the task loss.
"""

import keras
from keras import ops

__all__ = ["OutputSlice", "TaskAccuracy", "TaskLoss"]


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
    labels = ops.cast(ops.reshape(y_true, (-1,)), "int32") + self.label_offset
    return ops.cast(ops.equal(ops.cast(predicted, "int32"), labels), "float32")

  def get_config(self):
    return {"start": self.start, "stop": self.stop,
            "label_offset": self.label_offset, "name": self.name,
            "dtype": self.dtype}
