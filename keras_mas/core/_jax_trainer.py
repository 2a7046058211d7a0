"""MASModel's train step on Keras's JAX backend.

The same step as `keras_mas.core.trainer` (TensorFlow's), written for Keras's
stateless JAX trainer: Keras calls `train_step(state, data)` inside `jax.jit`
and the step returns `(logs, state)`. Every variable it reads comes from
`state`, never from a variable itself: during `fit` Keras's JAX trainer
purges the variables' values, and a value read outside the state would be
traced into the compiled step as a constant (stale from the next step on).

The step, in order, as TensorFlow's:

1. the task loss alone (Keras's `compute_loss`, without the penalty) and its
   gradient, by `jax.value_and_grad` over `stateless_call`;
2. the penalty `λ Σ Ω (θ − θ*)²`: its value for the logs, and in
   `penalty_mode="gradient"` its closed-form gradient `2λΩ(θ − θ*)` added to
   the task gradient (`keras_mas.core.penalty.penalized_gradients`'s math);
3. the optimizer's update (`optimizer.stateless_apply`);
4. in `penalty_mode="proximal"`, the proximal step `(θ + cθ*) / (1 + c)`,
   `c = 2·η·λ·Ω`, with η the learning rate after the update;
5. Synaptic Intelligence's path integral, when tracked: `ω += −g·Δθ`;
6. the metrics: `loss` (task loss plus penalty), `task_loss`, `mas_penalty`
   and the compiled metrics.
"""

import jax
import jax.numpy as jnp
import keras
from keras import ops
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_mas.core.penalty import total

__all__ = ["train_step"]


class _Values:
  """The values `state` holds for the model's variables, looked up by
  variable; `set` records a new value, `lists` gives the state back."""

  def __init__(self, groups):
    self._groups = [(list(refs), list(values)) for refs, values in groups]
    self._where = {}
    for g, (refs, _) in enumerate(self._groups):
      for i, v in enumerate(refs):
        self._where.setdefault(id(v), (g, i))

  def __getitem__(self, variable):
    g, i = self._where[id(variable)]
    return self._groups[g][1][i]

  def __contains__(self, variable):
    return id(variable) in self._where

  def set(self, variable, value):
    g, i = self._where[id(variable)]
    self._groups[g][1][i] = value

  def mapping(self, *groups):
    """`StatelessScope` pairs of the groups numbered `groups`."""
    return [pair for g in groups for pair in zip(*self._groups[g])]

  def group(self, g):
    return list(self._groups[g][1])


_TRAINABLE, _NON_TRAINABLE, _OPTIMIZER, _METRICS = range(4)


def train_step(model, state, data):
  """One training step of the `MASModel` `model`, stateless.

  The model has no rehearsal buffer (`MASModel.rehearsal` refuses one on
  JAX).

  Args:
    model: the `MASModel`, whose MAS state exists (`make_train_function`
      creates it before tracing).
    state: Keras's `(trainable, non_trainable, optimizer, metrics)` values.
    data: the batch, `(x, y)` or `(x, y, sample_weight)`.

  Returns:
    `(logs, state)`, as Keras's `JAXTrainer.train_step` returns them.
  """
  trainable, non_trainable, optimizer_values, metrics_values = state
  optimizer = model.optimizer
  values = _Values([(model.trainable_variables, trainable),
                    (model.non_trainable_variables, non_trainable),
                    (optimizer.variables, optimizer_values),
                    (model.metrics_variables, metrics_values)])
  x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
  mas = model._mas  # pylint: disable=protected-access

  # 1. The task loss and its gradient.
  def task_loss(trainable_values):
    kwargs = {}
    if model._call_has_training_arg:  # pylint: disable=protected-access
      kwargs["training"] = True
    y_pred, new_non_trainable, losses = model.stateless_call(
        trainable_values, non_trainable, x, return_losses=True, **kwargs)
    if losses:
      # Losses of the forward pass (`add_loss`), as Keras's trainer hands
      # them to `compute_loss`.
      model._losses_override.clear()  # pylint: disable=protected-access
      model._losses_override = losses  # pylint: disable=protected-access
    mapping = (list(zip(model.trainable_variables, trainable_values))
               + list(zip(model.non_trainable_variables, new_non_trainable))
               + values.mapping(_METRICS))
    with keras.StatelessScope(state_mapping=mapping) as scope:
      # Keras's loss alone: MASModel.compute_loss would add the penalty,
      # whose gradient is added below in closed form.
      loss = keras.Model.compute_loss(model, x, y, y_pred, sample_weight,
                                      training=True)
    if losses:
      model._losses_override.clear()  # pylint: disable=protected-access
    metrics_after = [_current(scope, v, values[v])
                     for v in model.metrics_variables]
    with keras.StatelessScope(state_mapping=values.mapping(_OPTIMIZER)):
      scaled = optimizer.scale_loss(loss)
    return scaled, (loss, y_pred, new_non_trainable, metrics_after)

  (_, (loss, y_pred, new_non_trainable, metrics_after)), gradients = (
      jax.value_and_grad(task_loss, has_aux=True)(trainable))
  for v, value in zip(model.non_trainable_variables, new_non_trainable):
    values.set(v, value)
  for v, value in zip(model.metrics_variables, metrics_after):
    values.set(v, value)
  gradients = list(gradients)
  task_gradients = list(gradients)
  with keras.StatelessScope(state_mapping=values.mapping(_OPTIMIZER)):
    loss_scale = ops.cast(optimizer.scale_loss(ops.ones((), "float32")),
                          "float32")

  # 2. The penalty: value, and gradient unless proximal.
  strength = ops.cast(values[mas.strength], "float32")
  slots = {id(v): i for i, v in enumerate(model.trainable_variables)}
  proximal = model._proximal  # pylint: disable=protected-access
  pieces = []
  for v, omega, anchor in zip(mas.targets, mas.importances, mas.anchors):
    drift = ops.cast(values[v], "float32") - values[anchor]
    weighted = values[omega] * drift
    pieces.append((weighted, drift))
    i = slots.get(id(v))
    if i is not None and not proximal:
      # Where the task gradient stands: scaled for loss scaling.
      step = ops.cast(2.0 * strength * loss_scale * weighted,
                      gradients[i].dtype)
      gradients[i] = gradients[i] + step

  def penalty_value():
    return strength * total([ops.sum(w * d) for w, d in pieces])

  interval = model._penalty_log_interval  # pylint: disable=protected-access
  tracker = model.penalty_tracker
  if interval > 1:
    count = values[tracker.count]
    iterations = values[optimizer.iterations]
    due = jnp.logical_or(count == 0, iterations % interval == 0)
    penalty = jax.lax.cond(due, penalty_value,
                           lambda: jnp.zeros((), "float32"))
  else:
    due = None
    penalty = penalty_value()

  # SI reads the step before the update.
  path = model.path_integral
  if path is not None:
    by_slot = [slots.get(id(v)) for v in path.targets]
    si_gradients = [None if i is None
                    else ops.cast(task_gradients[i], "float32") / loss_scale
                    for i in by_slot]
    si_before = [ops.cast(values[v], "float32") for v in path.targets]

  # 3. The optimizer's update.
  new_trainable, new_optimizer = optimizer.stateless_apply(
      values.group(_OPTIMIZER), gradients, values.group(_TRAINABLE))
  for v, value in zip(model.trainable_variables, new_trainable):
    values.set(v, value)
  for v, value in zip(optimizer.variables, new_optimizer):
    values.set(v, value)

  # 4. The proximal step, at the learning rate after the update (as
  # TensorFlow's step reads it).
  if proximal:
    with keras.StatelessScope(state_mapping=values.mapping(_OPTIMIZER)):
      rate = ops.cast(optimizer.learning_rate, "float32") * 2.0 * strength
    for v, omega, anchor in zip(mas.targets, mas.importances, mas.anchors):
      c = rate * values[omega]
      theta = values[v]
      values.set(v, ops.cast((ops.cast(theta, "float32") + c * values[anchor])
                             / (1.0 + c), theta.dtype))

  # 5. Synaptic Intelligence: ω += −g·Δθ.
  if path is not None:
    for w, g, v, before in zip(path.integrals, si_gradients, path.targets,
                               si_before):
      if g is not None:
        values.set(w, values[w] - g * (ops.cast(values[v], "float32")
                                       - before))

  # 6. The metrics.
  with keras.StatelessScope(state_mapping=values.mapping(_METRICS)) as scope:
    if due is None:
      tracker.update_state(penalty)
    else:
      tracker.update_state(penalty, sample_weight=ops.cast(due, "float32"))
      penalty = jnp.where(due, penalty, tracker.result())
    batch = next(t for t in keras.tree.flatten(x) if t is not None).shape[0]
    model._loss_tracker.update_state(  # pylint: disable=protected-access
        loss + ops.cast(penalty, loss.dtype), sample_weight=batch)
    model.task_loss_tracker.update_state(loss)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
  for v in model.metrics_variables:
    values.set(v, _current(scope, v, values[v]))

  return logs, (values.group(_TRAINABLE), values.group(_NON_TRAINABLE),
                values.group(_OPTIMIZER), values.group(_METRICS))


def _current(scope, variable, default):
  value = scope.get_current_value(variable)
  return default if value is None else value
