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
alone. The step serves TensorFlow (traced into a `tf.function`, gradients
from the tape) and PyTorch (run eagerly, gradients from autograd); the terms
are written in `keras.ops`. On JAX the same terms and `_update` run inside
Keras's stateless trainer: `keras_mas.core._jax_trainer` differentiates with
`jax.value_and_grad` and runs `_update` in a `keras.StatelessScope` that maps
every variable to its value in the trainer's state.
"""

import contextlib
import dataclasses

import keras
from keras.src.losses import loss as loss_module
import tensorflow as tf

from keras_mas import _backend

if _backend.TORCH:
  import torch  # pylint: disable=g-import-not-at-top

__all__ = ["Step", "train_step"]


@dataclasses.dataclass
class Step:
  """What the terms of one train step read and change.

  Attributes:
    variables: the model's trainable variables, in the optimizer's order.
    task_gradients: the (scaled) task loss's gradients, as the tape
      (TensorFlow) or autograd (PyTorch) gave them.
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
    incoming = _batch_size(x)
    x, y, sample_weight = _in_tensorflow(rehearsal.join,
                                         (x, y, sample_weight))
  optimizer = model.optimizer
  y_pred, loss, variables, gradients = _differentiated(
      model, x, y, sample_weight, task_loss)
  with _updating():
    return _update(model, x, y, y_pred, sample_weight, loss, gradients,
                   variables, optimizer, make_terms,
                   incoming if rehearsal is not None else None)


def _forward(model, x):
  if model._call_has_training_arg:  # pylint: disable=protected-access
    return model(x, training=True)
  return model(x)


def _differentiated(model, x, y, sample_weight, task_loss):
  """`(y_pred, loss, variables, gradients)`: the task loss, the trainable
  variables (read after the forward pass, which builds a subclassed model)
  and the scaled loss's gradients."""
  optimizer = model.optimizer
  if _backend.TORCH:
    # As Keras's own PyTorch step: autograd, then the update without it
    # (`_updating`).
    y_pred = _forward(model, x)
    model.zero_grad()
    loss = task_loss(x, y, y_pred, sample_weight)
    scaled_loss = optimizer.scale_loss(loss) if optimizer is not None else loss
    variables = model.trainable_variables
    if variables:  # All frozen: nothing to differentiate (as the tape).
      scaled_loss.backward()
    return y_pred, loss, variables, [v.value.grad for v in variables]
  with tf.GradientTape() as tape:
    y_pred = _forward(model, x)
    loss = task_loss(x, y, y_pred, sample_weight)
    scaled_loss = optimizer.scale_loss(loss) if optimizer is not None else loss
  variables = model.trainable_variables
  return y_pred, loss, variables, tape.gradient(scaled_loss, variables)


def _updating():
  """The context of the update: outside autograd's graph on PyTorch."""
  return torch.no_grad() if _backend.TORCH else contextlib.nullcontext()


def _apply_gradients(optimizer, gradients, variables):
  """The optimizer's update (JAX's step passes its stateless one)."""
  optimizer.apply_gradients(zip(gradients, variables))


def _update(model, x, y, y_pred, sample_weight, loss, gradients, variables,
            optimizer, make_terms, incoming, apply_gradients=_apply_gradients):
  """The terms around the optimizer's update, then the metrics.

  The step of every backend: TensorFlow's traced, PyTorch's eager, JAX's
  inside a `keras.StatelessScope` (`keras_mas.core._jax_trainer`), where
  `apply_gradients(optimizer, gradients, variables)` is stateless.
  """
  rehearsal = model.rehearsal
  one = keras.ops.ones((), "float32")
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
  if variables:  # Keras's optimizer refuses an empty update.
    apply_gradients(optimizer, step.gradients, variables)
  for term in terms:
    term.after_update(step)

  whole_batch_loss = loss_module.unscale_loss_for_distribution(loss)
  penalty = step.penalty if step.penalty is not None else keras.ops.zeros(
      (), whole_batch_loss.dtype)
  model._loss_tracker.update_state(  # pylint: disable=protected-access
      whole_batch_loss + penalty, sample_weight=_batch_size(x))
  model.task_loss_tracker.update_state(whole_batch_loss)
  if rehearsal is not None:
    _in_tensorflow(lambda *args: rehearsal.update(*args, incoming),
                   (x, y, y_pred))
    x, y, y_pred = tf.nest.map_structure(lambda t: t[:incoming],
                                         (x, y, y_pred))
    if sample_weight is not None:
      sample_weight = sample_weight[:incoming]
  return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _in_tensorflow(function, tensors):
  """`function(*tensors)`, written in TensorFlow ops (a rehearsal buffer's
  `join` and `update`). On TensorFlow it is traced into the step; on
  PyTorch it runs eagerly on host copies of the tensors' values (the
  buffer's samples stay in TensorFlow variables), Keras's own ops inside it
  (the buffer's loss) on the CPU, and its tensors come back as PyTorch's on
  Keras's device."""
  if _backend.TENSORFLOW:
    return function(*tensors)
  with keras.device("cpu"):
    result = function(*tf.nest.map_structure(
        lambda t: None if t is None else tf.convert_to_tensor(
            keras.ops.convert_to_numpy(t)), tensors))
  return tf.nest.map_structure(
      lambda t: None if t is None else keras.ops.convert_to_tensor(
          t.numpy()), result)


def _batch_size(x):
  first = next(t for t in keras.tree.flatten(x) if t is not None)
  if _backend.TENSORFLOW:
    return tf.shape(first)[0]
  return first.shape[0]
