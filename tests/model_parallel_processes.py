"""One process of a MAS run across processes, or the same run in one.

Run by tests/model_parallel_test.py:

  KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python tests/model_parallel_processes.py OUT.npz PROCESS_ID 2 PORT
  KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/model_parallel_processes.py OUT.npz

A Gemma causal LM on the mesh (2, 4) over every process's devices
(`keras.distribution.initialize` with a coordinator on localhost): Ω after
`consolidate`, then the weights after two steps of `fit`. Each process
gives its own half of every global batch, as Keras's JAX trainer expects
(the mesh's first row is process 0's devices); the run in one process
gives the whole batches. Process 0 alone writes OUT.npz.
"""

import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
_BATCH = 8


def _local(tree, process, processes):
  """This process's part of each global batch of `tree`."""
  if processes == 1:
    return tree
  share = _BATCH // processes

  def part(a):
    rows = [a[i + process * share:i + (process + 1) * share]
            for i in range(0, len(a), _BATCH)]
    return np.concatenate(rows)
  return keras.tree.map_structure(part, tree)


def main(out, process=0, processes=1, port=None):
  import jax
  if processes > 1:
    keras.distribution.initialize(job_addresses=f"localhost:{port}",
                                  num_processes=processes,
                                  process_id=process)
  from jax.experimental import multihost_utils
  import keras_hub
  import keras_mas
  import model_parallel_helper as helper
  from keras_mas.core import model_parallel
  distribution = model_parallel.make_distribution(
      (2, 4), layout_map=model_parallel.layout_map_of(
          keras_hub.models.GemmaBackbone))
  distribution.auto_shard_dataset = False  # Each process gives its own.
  keras.distribution.set_distribution(distribution)
  x, y = helper._data("causal_lm")  # pylint: disable=protected-access
  x, y = _local((x, y), process, processes)
  local_batch = _BATCH // processes
  net = keras_mas.MASModel.from_model(helper._build("causal_lm", False))  # pylint: disable=protected-access
  net.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True))
  net.consolidate(x, strength=0.1, batch_size=local_batch)
  gather = lambda v: np.asarray(multihost_utils.process_allgather(
      v.value, tiled=True))
  omega = [gather(o) for o in net.importances]
  net.fit(x, y, epochs=1, batch_size=local_batch, shuffle=False, verbose=0)
  weights = [gather(v) for v in net.trainable_variables]
  if jax.process_index() == 0:
    np.savez(out, **{f"omega_{i}": a for i, a in enumerate(omega)},
             **{f"weight_{i}": a for i, a in enumerate(weights)})
  print("done", jax.process_index(), jax.process_count(), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
