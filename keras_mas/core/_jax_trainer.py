"""MASModel's train step on Keras's JAX backend: `keras_mas.core.trainer`'s.

The step is TensorFlow's and PyTorch's, the same terms
(`keras_mas.core.penalty.PenaltyTerm`, `keras_mas.core.path_integral`)
around the optimizer's update and the same metrics (`trainer._update`). The
one thing that differs is that the step runs on values, not on variables:
Keras's JAX trainer calls `train_step(state, data)` inside `jax.jit` with
the variables' values in `state` and wants their new values back, and
during `fit` it purges the variables themselves, so a variable read directly
would be traced into the compiled step as a constant (stale from the next
step on). Hence this adapter:

1. the task loss's gradient by `jax.value_and_grad` over `stateless_call`
   (as Keras's own JAX trainer differentiates), not by a tape;
2. the update chain inside one `keras.StatelessScope` that maps every
   variable of the state to its value: the terms' reads of a variable give
   its value from the state, and their `assign`s are recorded in the scope,
   from which the new state is read back;
3. the optimizer's update by `optimizer.stateless_apply` rather than
   `apply_gradients`: a `LossScaleOptimizer`'s stateful `apply` assigns
   inside `jax.lax.cond` branches, whose values cannot leave the branch
   through the scope.

Rehearsal is not supported (`MASModel.rehearsal` refuses a buffer on JAX):
its buffer is written in TensorFlow ops, and JAX compiles the step whole.
"""

import jax
import keras
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_mas.core import trainer

__all__ = ["train_step"]


def train_step(model, state, data, task_loss, make_terms):
  """One training step of the `MASModel` `model`, stateless.

  Args:
    model: the `MASModel`, whose MAS state exists (`make_train_function`
      creates it before tracing) and which has no rehearsal buffer.
    state: Keras's `(trainable, non_trainable, optimizer, metrics)` values.
    data: the batch, `(x, y)` or `(x, y, sample_weight)`.
    task_loss: as `keras_mas.core.trainer.train_step`'s.
    make_terms: as `keras_mas.core.trainer.train_step`'s.

  Returns:
    `(logs, state)`, as Keras's `JAXTrainer.train_step` returns them.
  """
  assert model.rehearsal is None, "MASModel.rehearsal refuses a buffer on JAX"
  trainable, non_trainable, optimizer_values, metrics_values = state
  optimizer = model.optimizer
  groups = (model.trainable_variables, model.non_trainable_variables,
            optimizer.variables, model.metrics_variables)
  x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)

  def scaled_task_loss(trainable_values):
    # As Keras's `JAXTrainer.compute_loss_and_updates`, with the task loss
    # alone (MASModel.compute_loss would add the penalty, whose gradient the
    # penalty term adds in closed form).
    # pylint: disable-next=protected-access
    kwargs = {"training": True} if model._call_has_training_arg else {}
    y_pred, new_non_trainable, losses = model.stateless_call(
        trainable_values, non_trainable, x, return_losses=True, **kwargs)
    if losses:
      # Losses of the forward pass (`add_loss`), as Keras's trainer hands
      # them to `compute_loss`.
      model._losses_override.clear()  # pylint: disable=protected-access
      model._losses_override = losses  # pylint: disable=protected-access
    with keras.StatelessScope(state_mapping=_pairs(
        groups, (trainable_values, new_non_trainable, optimizer_values,
                 metrics_values))) as scope:
      loss = task_loss(x, y, y_pred, sample_weight)
      scaled = optimizer.scale_loss(loss)
    if losses:
      model._losses_override.clear()  # pylint: disable=protected-access
    # The metrics `compute_loss` updated (Keras's per-output losses).
    metrics_after = [scope.get_current_value(v)
                     for v in model.metrics_variables]
    return scaled, (loss, y_pred, new_non_trainable, metrics_after)

  (_, (loss, y_pred, non_trainable, metrics_values)), gradients = (
      jax.value_and_grad(scaled_task_loss, has_aux=True)(trainable))
  values = (trainable, non_trainable, optimizer_values, metrics_values)
  with keras.StatelessScope(state_mapping=_pairs(groups, values)) as scope:
    logs = trainer._update(  # pylint: disable=protected-access
        model, x, y, y_pred, sample_weight, loss, list(gradients),
        model.trainable_variables, optimizer, make_terms, None,
        apply_gradients=_stateless_apply)
  # Every variable is mapped in the scope: its value there is the new one.
  return logs, tuple([scope.get_current_value(v) for v in group]
                     for group in groups)


def _stateless_apply(optimizer, gradients, variables):
  """The optimizer's update of `variables`, inside the step's scope: on the
  values the scope holds, the new ones assigned back into it."""
  new_variables, new_optimizer_values = optimizer.stateless_apply(
      [v.value for v in optimizer.variables], gradients,
      [v.value for v in variables])
  for v, value in zip(variables, new_variables):
    v.assign(value)
  for v, value in zip(optimizer.variables, new_optimizer_values):
    v.assign(value)


def _pairs(groups, values):
  """`StatelessScope` pairs: each variable of `groups` with its value."""
  return [pair for group, group_values in zip(groups, values)
          for pair in zip(group, group_values)]
