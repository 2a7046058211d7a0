"""Keras 3.15's `fit` under `MultiWorkerMirroredStrategy` (keras-team/keras#20585).

Two small fixes `MASModel` applies through its trainer hooks, so MASModels
train where plain `keras.Model`s fail; each is a no-op under any other
strategy. Remove when Keras fixes the issue.
"""

import tensorflow as tf

__all__ = ["element_spec", "is_multi_worker", "replica_logs", "symbolic_build"]


def is_multi_worker(strategy):
  """Whether `strategy` is a `MultiWorkerMirroredStrategy`."""
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def replica_logs(strategy, logs):
  """Gives each scalar log the axis Keras reduces along.

  Keras reduces each log with `strategy.reduce("MEAN", v, axis=0)` under
  `MultiWorkerMirroredStrategy`, which needs an axis to reduce.

  Args:
    strategy: the model's distribution strategy, or None.
    logs: dict of scalar tensors from a train or test step.

  Returns:
    `logs`, each value of shape `[1]` under `MultiWorkerMirroredStrategy`.
  """
  if not is_multi_worker(strategy):
    return logs
  return {k: tf.reshape(v, [1]) for k, v in logs.items()}


def element_spec(iterator):
  """The `tf.TensorSpec`s of the batches Keras's epoch `iterator` yields.

  None when they are not all dense tensors (a build then needs a batch).
  """
  adapter = getattr(iterator, "data_adapter", None)
  if adapter is None:
    return None
  spec = adapter.get_tf_dataset().element_spec
  if not all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(spec)):
    return None
  return spec


def symbolic_build(model, strategy, iterator):
  """Builds `model` from this worker's first local share of a batch.

  Keras builds from a batch it reduces across replicas with MEAN, which
  fails under `MultiWorkerMirroredStrategy` ("Attempt to convert a value
  (PerReplica...)"); one local share has the same shapes.

  Args:
    model: the model to build (Keras's `_symbolic_build`).
    strategy: a `MultiWorkerMirroredStrategy`.
    iterator: Keras's epoch iterator.
  """
  for _, _, it in iterator:
    data_batch = tf.nest.map_structure(
        lambda v: (strategy.experimental_local_results(v)[0]
                   if isinstance(v, tf.distribute.DistributedValues) else v),
        next(it))
    break
  with strategy.scope():
    model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access
