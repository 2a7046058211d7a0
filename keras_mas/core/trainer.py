"""MASModel's train step, composed of independent terms.

The step differentiates the task loss, then hands the update to a chain of
terms, as optax chains gradient transforms and Keras optimizers apply
weight decay: each term may change the gradients before the optimizer's
update (`before_update`) and act on the variables after it
(`after_update`). The terms are the MAS penalty (`keras_mas.core.penalty`:
its closed-form gradient, or the proximal step) and Synaptic Intelligence's
path integral (`keras_mas.core.path_integral`). Rehearsal
(`MASModel.rehearsal`) joins a buffer to the batch before the forward pass
and updates it after the step; metrics then count the incoming samples
alone. The TensorFlow-specific parts (the tape, `tf.shape`) are here; another
Keras backend adds its own step beside this one.
"""

import dataclasses

import keras
from keras.src.losses import loss as loss_module
import tensorflow as tf

__all__ = ["Step", "train_step"]


@dataclasses.dataclass
class Step:
  """What the terms of one train step read and change.

  Attributes:
    variables: the model's trainable variables, in the optimizer's order.
    task_gradients: the (scaled) task loss's gradients, as the tape gave them.
    gradients: what the optimizer will apply; terms may change entries.
    optimizer: the model's optimizer.
    loss_scale: the optimizer's loss scale (1 without mixed precision).
    gradient_scale: the factor a term's own gradient needs to stand where
      the task gradient stands (loss scale, divided among replicas).
    penalty: the penalty's value for the logs (set by the penalty term).
  """
  variables: list
  task_gradients: list
  gradients: list
  optimizer: object
  loss_scale: tf.Tensor
  gradient_scale: tf.Tensor
  penalty: tf.Tensor = None


def train_step(model, data, task_loss, make_terms):
  """One training step of `model` on the batch `data`.

  Args:
    model: the `MASModel`.
    data: the batch, `(x, y)` or `(x, y, sample_weight)`.
    task_loss: `(x, y, y_pred, sample_weight) -> ` the task loss alone (Keras's
      `compute_loss`, without the penalty).
    make_terms: `() -> ` the terms, objects with `before_update(step)` and
      `after_update(step)`, applied in order around the optimizer's update.
      Called after the forward pass, which builds a subclassed model that
      `fit` builds.

  Returns:
    The metrics' results, as Keras's `train_step` returns them.
  """
  x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
  rehearsal = model.rehearsal
  if rehearsal is not None:
    incoming = tf.shape(tf.nest.flatten(x)[0])[0]
    x, y, sample_weight = rehearsal.join(x, y, sample_weight)
  optimizer = model.optimizer
  with tf.GradientTape() as tape:
    if model._call_has_training_arg:  # pylint: disable=protected-access
      y_pred = model(x, training=True)
    else:
      y_pred = model(x)
    loss = task_loss(x, y, y_pred, sample_weight)
    scaled_loss = optimizer.scale_loss(loss) if optimizer is not None else loss
  variables = model.trainable_variables
  gradients = tape.gradient(scaled_loss, variables)
  one = tf.ones((), "float32")
  loss_scale = optimizer.scale_loss(one) if optimizer is not None else one
  # pylint: disable-next=protected-access
  gradient_scale = model._aggregate_additional_loss(loss_scale)
  step = Step(
      variables=variables, task_gradients=list(gradients),
      gradients=list(gradients), optimizer=optimizer, loss_scale=loss_scale,
      gradient_scale=gradient_scale)
  terms = make_terms()
  for term in terms:
    term.before_update(step)
  optimizer.apply_gradients(zip(step.gradients, variables))
  for term in terms:
    term.after_update(step)

  whole_batch_loss = loss_module.unscale_loss_for_distribution(loss)
  penalty = step.penalty if step.penalty is not None else tf.zeros(
      (), whole_batch_loss.dtype)
  model._loss_tracker.update_state(  # pylint: disable=protected-access
      whole_batch_loss + penalty,
      sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
  model.task_loss_tracker.update_state(whole_batch_loss)
  if rehearsal is not None:
    rehearsal.update(x, y, y_pred, incoming)
    x, y, y_pred = tf.nest.map_structure(lambda t: t[:incoming],
                                         (x, y, y_pred))
    if sample_weight is not None:
      sample_weight = sample_weight[:incoming]
  return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
