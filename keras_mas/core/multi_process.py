"""One run over several JAX processes: who writes, what each feeds, what
each reads back.

After `keras.distribution.initialize`, the processes of a run (one per
machine, or several on one) share one device mesh; each runs the same
program. Three things differ from one process:

* **Writing.** Process 0 alone writes the run's files
  (`keras_mas.experiments.checkpoints.is_chief`); the others write into a
  scratch folder that is removed, so every process runs the same code.
* **Feeding.** Each process gives its own part of every global batch,
  the rows Keras's `distribute_dataset` would give it: `local_part` takes
  them from an array batch that every process holds whole (`consolidate`'s
  importance batches), `own_rows` from each batch of a dataset for `fit`.
* **Reading.** A value sharded over devices of other processes cannot be
  fetched to NumPy by one process alone. `whole_value` gathers it (every
  process calls it), and `whole_values` lends a model's variables their
  gathered values while Keras saves them.

Every function here is a no-op for one process, and on TensorFlow and
PyTorch.
"""

import contextlib

import keras
import numpy as np

__all__ = ["count", "index", "local_part", "own_rows", "peer_lost",
           "whole_value", "whole_values"]

# What JAX's runtime says when another process of the run has gone: its
# collectives' connections close, or the coordinator misses its heartbeats.
_PEER_LOST = ("Gloo", "Connection closed", "Connection reset", "heartbeat",
              "coordination service", "Coordination service")


def count():
  """The number of processes of the run (1 without `initialize`)."""
  if keras.backend.backend() != "jax":
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def index():
  """This process's number in the run, from 0."""
  if keras.backend.backend() != "jax":
    return 0
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def peer_lost(error):
  """Whether `error` says that another process of the run has stopped
  (killed, crashed, preempted): this one cannot go on without it."""
  return count() > 1 and any(s in str(error) for s in _PEER_LOST)


def local_part(batch, global_size):
  """This process's rows of `batch`, a global batch every process holds.

  The rows Keras's `distribute_dataset` gives this process of a global
  batch of `global_size`: its share of the model copies' (the mesh's data
  axis's) samples; all of them when the data axis does not span
  processes. Unchanged for one process, or where the distribution's
  `auto_shard_dataset` is off (each process gives its own samples then).

  Args:
    batch: a structure of arrays with `global_size` rows.
    global_size: the global batch's size.

  Returns:
    The same structure, each array cut to this process's rows.
  """
  distribution = keras.distribution.distribution()
  if (count() == 1 or distribution is None
      or not distribution.auto_shard_dataset):
    return batch
  replicas = distribution.num_model_replicas
  if replicas == 1:
    return batch
  if replicas >= count():
    shards, shard = count(), index()
  else:
    shards, shard = replicas, distribution.data_shard_id
  rows = global_size // shards
  return keras.tree.map_structure(
      lambda a: a[shard * rows:(shard + 1) * rows], batch)


@contextlib.contextmanager
def own_rows(dataset):
  """`dataset` as `fit` takes it while open: each process's rows of the
  global batches it yields (`local_part`), Keras's own sharding off.

  Keras's `distribute_dataset` needs a batch size it can read from the
  dataset (none after a `map`, nor with a smaller last batch) and splits a
  smaller last batch unevenly among the processes, which then hold global
  batches of different shapes. Every process draws the same global batches
  instead (the same seeded order) and keeps its rows of each, the last one
  included: the steps are those of one process over all the devices.

  Args:
    dataset: a `tf.data.Dataset` of global batches, the same in every
      process.

  Yields:
    `dataset` itself for one process, under no distribution, or where the
    distribution's `auto_shard_dataset` is off (each process gives its own
    samples then); else this process's part of each batch.
  """
  distribution = keras.distribution.distribution()
  if (count() == 1 or distribution is None
      or not distribution.auto_shard_dataset):
    yield dataset
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def part(*batch):
    size = tf.shape(tf.nest.flatten(batch)[0])[0]
    rows = local_part(batch, size)
    return rows if len(rows) > 1 else rows[0]

  mapped = dataset.map(part)  # Traced now, while Keras still shards.
  distribution.auto_shard_dataset = False
  try:
    yield mapped
  finally:
    distribution.auto_shard_dataset = True


def _held_whole_by_each(sharding, shape):
  """Whether every process's devices hold every piece of an array."""
  pieces = {}
  for device, where in sharding.devices_indices_map(tuple(shape)).items():
    key = tuple((s.start, s.stop, s.step) for s in where)
    pieces.setdefault(device.process_index, set()).add(key)
  every = set().union(*pieces.values())
  return all(held == every for held in pieces.values())


def _spans_processes(array):
  """Whether `array` has pieces that only another process holds. The same
  answer in every process (from the sharding alone): gathering is
  collective."""
  sharding = getattr(array, "sharding", None)
  if sharding is None or getattr(array, "is_fully_addressable", True):
    return False
  return not _held_whole_by_each(sharding, array.shape)


def whole_value(array):
  """`array`'s whole value as NumPy in this process.

  Every process of the run must call it with the same array (for an array
  that spans processes it is an all-gather).
  """
  if not _spans_processes(array):
    return np.asarray(array)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@contextlib.contextmanager
def whole_values(model):
  """While open, the variables of `model` and of its optimizer that span
  processes hold their whole value on this process's devices, so that
  Keras's saving (`model.save`, an export) reads them.

  Every process of the run must enter it, at the same point (it gathers);
  the values are put back on exit. Variables laid out over the devices of
  every process are moved too, those this process holds whole included:
  saving may combine two values (KerasHub merges LoRA's factors into their
  kernel), which must then lie on the same device.
  """
  if count() == 1:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  optimizer = getattr(model, "optimizer", None)
  variables, seen = [], set()
  for v in list(model.variables) + list(getattr(optimizer, "variables", [])):
    if id(v) not in seen and not getattr(v.value, "is_fully_addressable",
                                         True):
      seen.add(id(v))
      variables.append(v)
  gathered = multihost_utils.process_allgather(
      [v.value for v in variables], tiled=True)
  kept = [v._value for v in variables]  # pylint: disable=protected-access
  local = jax.local_devices()[0]
  try:
    # Keras's `assign` would lay the value out on the mesh again; the
    # value is swapped in as it is, on one device of this process.
    for v, value in zip(variables, gathered):
      v._value = jax.device_put(value, local)  # pylint: disable=protected-access
    yield
  finally:
    for v, value in zip(variables, kept):
      v._value = value  # pylint: disable=protected-access
