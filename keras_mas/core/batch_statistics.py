"""BatchNormalization statistics across tasks.

MAS protects trainable weights. A `BatchNormalization` layer's moving mean
and variance are not trainable: Keras moves them towards each training
batch (momentum 0.99, 0.999 in `keras.applications`), so after a short task
they still hold their initial values (the model tests at chance in
inference mode), and after a long one they hold only the newest task's
data. This module sets them deliberately, from data:

* `population_statistics` measures, for every BatchNormalization layer, the
  mean and variance of its inputs over a dataset, as the layer saw them in
  training (each batch normalised by its own statistics), exactly: the
  mean of the batch means and the mean of the batch second moments, weighted
  by batch size ("precise BatchNorm", Wu & Johnson 2021).
* `TaskStatistics` applies a policy after each task of a sequence (see
  `POLICIES`).

Example:

```python
model.fit(x_task, y_task, epochs=5)
keras_mas.core.batch_statistics.assign(
    model, keras_mas.core.batch_statistics.population_statistics(model, x_task))
```
"""

import keras
import numpy as np
import tensorflow as tf

from keras_mas.importance import _data

__all__ = ["POLICIES", "TaskStatistics", "assign", "batch_norm_layers",
           "population_statistics", "read"]

# What happens to the statistics after each task:
# - "recompute": the population statistics of the newest task alone;
# - "accumulate": the mean over the tasks so far of each task's population
#   statistics (a mixture with equal weight per task, as Ω accumulates);
# - "first_task": the first task's population statistics, kept after it
#   (a user's model keeps the statistics it came with);
# - "keras": Keras's moving averages, as training left them.
POLICIES = ("recompute", "accumulate", "first_task", "keras")


def batch_norm_layers(model):
  """The model's `BatchNormalization` layers, nested ones included."""
  # pylint: disable-next=protected-access
  layers = model._flatten_layers(include_self=False)
  return [layer for layer in layers
          if isinstance(layer, keras.layers.BatchNormalization)]


def read(model):
  """`[(moving_mean, moving_variance)]` of every BatchNormalization layer."""
  return [(np.array(layer.moving_mean), np.array(layer.moving_variance))
          for layer in batch_norm_layers(model)]


def assign(model, statistics):
  """Sets every BatchNormalization layer's moving mean and variance.

  Args:
    model: the model.
    statistics: `[(mean, variance)]`, one pair per layer of
      `batch_norm_layers(model)`, in that order.

  Raises:
    ValueError: naming `statistics`, if it does not match the layers.
  """
  layers = batch_norm_layers(model)
  if len(statistics) != len(layers) or any(
      np.shape(m) != tuple(l.moving_mean.shape) or
      np.shape(v) != tuple(l.moving_variance.shape)
      for l, (m, v) in zip(layers, statistics)):
    raise ValueError(
        "Invalid value for argument `statistics`. Expected (mean, variance) "
        f"of the shapes of the model's {len(layers)} BatchNormalization "
        f"layers. Received: {len(statistics)} pairs")
  for layer, (mean, variance) in zip(layers, statistics):
    layer.moving_mean.assign(np.asarray(mean, "float32"))
    layer.moving_variance.assign(np.asarray(variance, "float32"))


def population_statistics(model, data, num_samples=None, batch_size=256):
  """The mean and variance of each BatchNormalization layer's inputs.

  The model runs in training mode on `data` (each layer normalises a batch
  by that batch's statistics, as in `fit`); no weight and no moving
  statistic of the model changes.

  Args:
    model: a built Keras model.
    data: inputs: an array, or a batched `tf.data.Dataset` of `x`, `(x,)`,
      `(x, y)` or `(x, y, w)` (labels ignored).
    num_samples: use the first `num_samples` samples (all if None).
    batch_size: batch size for arrays; a dataset keeps its own.

  Returns:
    `[(mean, variance)]` as NumPy arrays, one pair per layer of
    `batch_norm_layers(model)`; `[]` for a model without any.

  Raises:
    ValueError: for invalid arguments or empty `data`.
  """
  layers = batch_norm_layers(model)
  if not layers:
    return []
  saved = [(layer.momentum, np.array(layer.moving_mean),
            np.array(layer.moving_variance)) for layer in layers]
  try:
    # Traced with momentum 0, each layer's moving statistics become the
    # batch's own: read back after every call.
    for layer in layers:
      layer.momentum = 0.0

    if keras.backend.backend() == "jax":
      moments = _jax_moments(model, layers)
    elif keras.backend.backend() == "torch":
      moments = _eager_moments(model, layers)
    else:

      @tf.function(reduce_retracing=True)
      def moments(x):
        model(x, training=True)
        return [(tf.cast(l.moving_mean, tf.float64),
                 tf.cast(l.moving_variance, tf.float64)) for l in layers]

    sums = [[0.0, 0.0] for _ in layers]
    count = 0
    for (x,) in _data.as_dataset(data, batch_size, num_samples):
      n = int(tf.shape(tf.nest.flatten(x)[0])[0])
      for total, (mean, variance) in zip(sums, moments(x)):
        mean, variance = np.asarray(mean), np.asarray(variance)
        total[0] += n * mean
        total[1] += n * (variance + mean ** 2)
      count += n
    _data.check_count(count, num_samples)
  finally:
    for layer, (momentum, mean, variance) in zip(layers, saved):
      layer.momentum = momentum
      layer.moving_mean.assign(mean)
      layer.moving_variance.assign(variance)
  means = [first / count for first, _ in sums]
  return [(mean, np.maximum(second / count - mean ** 2, 0.0))
          for mean, (_, second) in zip(means, sums)]


def _jax_moments(model, layers):
  """`moments` on JAX: the statistics a training-mode `stateless_call`
  returns (momentum 0: the batch's own), as float64 NumPy arrays. The
  variables' values are arguments of the compiled call, not constants."""
  import jax  # pylint: disable=g-import-not-at-top

  where = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
  slots = [(where[id(l.moving_mean)], where[id(l.moving_variance)])
           for l in layers]

  @jax.jit
  def call(trainable, non_trainable, x):
    _, updated = model.stateless_call(trainable, non_trainable, x,
                                      training=True)
    return [(updated[m], updated[v]) for m, v in slots]

  def moments(x):
    pairs = call([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 np.asarray(x))
    return [(np.asarray(m, "float64"), np.asarray(v, "float64"))
            for m, v in pairs]

  return moments


def _eager_moments(model, layers):
  """`moments` on PyTorch: a training-mode call, eager and without
  autograd, then the statistics it left (momentum 0: the batch's own)."""
  import torch  # pylint: disable=g-import-not-at-top

  def moments(x):
    with torch.no_grad():
      model(keras.tree.map_structure(
          lambda t: keras.ops.convert_to_tensor(np.asarray(t)), x),
            training=True)
    return [(np.asarray(keras.ops.convert_to_numpy(l.moving_mean), "float64"),
             np.asarray(keras.ops.convert_to_numpy(l.moving_variance),
                        "float64")) for l in layers]

  return moments


class TaskStatistics:
  """Sets a model's BatchNormalization statistics after each task.

  Call `before_task` before a task's `fit` (training moves the statistics)
  and `after_task` after it. Between tasks the model holds the statistics
  the policy chose, so a checkpoint of the model holds them too: `resume`
  needs only the number of tasks folded in.

  Args:
    policy: one of `POLICIES`.
    tasks_done: tasks already folded into the model's statistics: 0 for a
      model that starts untrained; 1 for a user's trained model, whose
      statistics then count as one task (`"accumulate"`) or are kept
      (`"first_task"`); more when resuming.

  Raises:
    ValueError: naming `batch_norm`, if `policy` is not one of `POLICIES`.
  """

  def __init__(self, policy, tasks_done=0):
    if policy not in POLICIES:
      raise ValueError(
          f"Invalid value for argument `batch_norm`. Expected one of "
          f"{list(POLICIES)}. Received: batch_norm={policy!r}")
    self.policy = policy
    self.tasks_done = int(tasks_done)
    self._before = None

  def before_task(self, model):
    """Remembers the statistics the policy set, before `fit` moves them."""
    self._before = read(model) if self.policy != "keras" else None

  def after_task(self, model, data, num_samples=None):
    """Measures the task's statistics on `data` and applies the policy."""
    if self.policy == "keras" or not batch_norm_layers(model):
      self.tasks_done += 1
      return
    if self.policy == "first_task" and self.tasks_done:
      assign(model, self._before)
    else:
      measured = population_statistics(model, data, num_samples)
      if self.policy == "accumulate" and self.tasks_done:
        measured = _mixture(self._before, measured,
                            self.tasks_done / (self.tasks_done + 1))
      assign(model, measured)
    self.tasks_done += 1


def _mixture(old, new, weight):
  """Mean and variance of `weight`·old + (1 − weight)·new, per layer."""
  mixed = []
  for (m0, v0), (m1, v1) in zip(old, new):
    mean = weight * m0 + (1 - weight) * m1
    second = weight * (v0 + m0 ** 2) + (1 - weight) * (v1 + m1 ** 2)
    mixed.append((mean, np.maximum(second - mean ** 2, 0.0)))
  return mixed
