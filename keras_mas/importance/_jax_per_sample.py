"""Exact per-sample importance on Keras's JAX backend.

`keras_mas.importance.estimators` computes, on TensorFlow, `Σ_k f(g_k)` from
per-layer closed forms (`keras_mas.importance.per_sample`). On JAX the same
sums come from the same per-layer forms (`_closed_forms`, in `keras.ops`)
and, for layers without one, from `jax.vmap(jax.grad(...))`: a gradient for
one sample, vectorized over the samples of a chunk. The chunks are sized
so that at most `per_sample._CHUNK_VALUES` per-sample gradient values exist
at once, and scanned (`jax.lax.scan`), so memory stays bounded whatever the
batch, as on TensorFlow.

* Global MAS and Fisher: per layer, as on TensorFlow, for the layers of
  `_closed_forms` (convolutions, embeddings, dense, einsum-dense and
  normalization layers): one batched pass gives each layer's inputs and,
  through zero probes added to its outputs, each sample's gradient `δ`
  there (samples are independent in inference mode); then each layer's own
  per-sample gradients from those (`Dense`: `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)`
  for f = |·| or (·)²; convolutions: each tap's shifted inputs ⊗ `δ`;
  `Embedding`: `δ` into the rows of the sample's ids). The variables of
  any other layer (recurrent, custom) come from the gradient of the
  sample's objective (the squared norm of the outputs, or the
  log-likelihood) through `stateless_call`, mapped, with respect to those
  variables alone. A model of plain `Dense` layers on
  `(batch, features)` (the main job's MLP) takes `_dense_sums`, 30× faster
  than the mapped gradients.
* Local MAS: for each unit of `per_sample.plan` (a layer and its own
  variables), the layer's calls are recorded during one forward pass; then
  the gradient of the squared norm of the layer's own output with respect to
  its own variables, its recorded inputs held fixed.

Each batch is one call of a function compiled with `jax.jit`, taking the
variables' values as arguments: a value read inside the trace would be
compiled in as a constant and go stale when the model trains on.
"""

import jax
import jax.numpy as jnp
import keras
from keras import ops
from keras.src.backend.jax import trainer as jax_trainer
import numpy as np
import tensorflow as tf

from keras_mas.core import multi_process
from keras_mas.importance import _closed_forms
from keras_mas.importance import _functional
from keras_mas.importance import per_sample as per_sample_lib

__all__ = ["global_step", "local_step", "run"]


def _outputs(model, trainable, non_trainable, x):
  """The model's outputs, padding positions zeroed."""
  outputs, _ = model.stateless_call(trainable, non_trainable, x,
                                    training=False)
  return _functional.masked(outputs, x)


def _chunked_sums(per_chunk, tree, n, chunk, zeros):
  """`Σ per_chunk(chunk of tree)` over the samples of `tree`, in chunks.

  Args:
    per_chunk: `tree -> ` a list of arrays, the sums over the chunk given.
    tree: arrays with `n` samples on their leading axis (None leaves allowed).
    n: the number of samples (static).
    chunk: samples per chunk (static).
    zeros: a list of zero arrays shaped like `per_chunk`'s result.

  Returns:
    The list of sums over all `n` samples.
  """
  full, rest = divmod(n, chunk)
  totals = list(zeros)
  if full == 1:
    totals = per_chunk(jax.tree_util.tree_map(lambda t: t[:chunk], tree))
  elif full > 1:
    parts = jax.tree_util.tree_map(
        lambda t: t[:full * chunk].reshape((full, chunk) + t.shape[1:]), tree)

    def body(carry, part):
      return [c + s for c, s in zip(carry, per_chunk(part))], None

    totals, _ = jax.lax.scan(body, totals, parts)
  if rest:
    tail = per_chunk(jax.tree_util.tree_map(lambda t: t[full * chunk:], tree))
    totals = [t + s for t, s in zip(totals, tail)]
  return totals


def _batch_size(x):
  return next(t for t in jax.tree_util.tree_leaves(x)).shape[0]


def _one(tree):
  """One sample (no batch axis) as a batch of one."""
  return jax.tree_util.tree_map(lambda t: t[None], tree)


_TRANSFORMS = {"abs": jnp.abs, "square": jnp.square}


def _dense_sums(model, units, objective, f, trainable, non_trainable, x, y):
  """Per-sample sums by the Dense closed form (`_functional.probed_forward`),
  or None where a unit is not called exactly once on rank-2 inputs."""
  base = _functional.state_pairs(model, trainable, non_trainable)
  shapes = [[] for _ in units]
  jax.eval_shape(lambda: _functional.probed_forward(model, units, base, x,
                                                    None, shapes))
  if any(len(calls) != 1 or len(calls[0].shape) != 2 for calls in shapes):
    return None
  probes = [jnp.zeros(calls[0].shape[:1] + (unit.layer.units,), "float32")
            for calls, unit in zip(shapes, units)]

  def total(probes):
    inputs = [[] for _ in units]
    outputs = _functional.probed_forward(
        model, units, base, x, lambda i, z: probes[i], inputs)
    return objective(outputs, y), [calls[0] for calls in inputs]

  deltas, inputs = jax.grad(total, has_aux=True)(probes)
  return _functional.dense_sums(model, units, f, inputs, deltas)


def _closed_form_sums(model, units, objective, f, trainable, non_trainable,
                      x, y):
  """`{id(variable): Σ_k f(g_k)}` of the variables of `units`
  (`_closed_forms`): one batched pass, probed, then each layer alone."""
  base = _functional.state_pairs(model, trainable, non_trainable)
  shapes = [[] for _ in units]

  def shape_of(i, z):
    shapes[i].append(z.shape)

  jax.eval_shape(lambda: _closed_forms.probed_forward(
      model, units, base, x, shape_of, [[] for _ in units]))
  probes = [[jnp.zeros(shape, "float32") for shape in calls]
            for calls in shapes]
  structures = []

  def total(probes):
    taken = [iter(calls) for calls in probes]
    calls = [[] for _ in units]
    outputs = _closed_forms.probed_forward(
        model, units, base, x, lambda i, z: next(taken[i]), calls)
    # Only arrays leave the differentiated function: the calls' other
    # arguments (flags, None) are kept aside, to be put back after.
    structures[:] = calls
    return objective(outputs, y), [
        [[leaf for leaf in keras.tree.flatten(call) if _is_array(leaf)]
         for call in unit_calls] for unit_calls in calls]

  deltas, arrays = jax.grad(total, has_aux=True)(probes)
  n = _batch_size(x)
  sums = {}
  for unit, unit_calls, unit_arrays, unit_deltas in zip(
      units, structures, arrays, deltas):
    calls = [_with_arrays(call, leaves)
             for call, leaves in zip(unit_calls, unit_arrays)]
    sums.update(_closed_forms.unit_sums(unit, calls, unit_deltas, f, base, n,
                                        _grad_sums, _chunked_sums,
                                        _same_padding))
  return sums


def _same_padding(layer, spatial_shape):
  """`(low, high)` per spatial axis: the padding of Keras's JAX convolution
  (XLA's "SAME") for inputs of `spatial_shape`."""
  dilated = [(k - 1) * r + 1 for k, r in zip(layer.kernel_size,
                                             layer.dilation_rate)]
  return jax.lax.padtype_to_pads(spatial_shape, dilated, layer.strides,
                                 "SAME")


def _is_array(leaf):
  return isinstance(leaf, (jax.Array, np.ndarray))


def _with_arrays(call, arrays):
  """`call` with its array leaves replaced by `arrays`, in order."""
  it = iter(arrays)
  return keras.tree.pack_sequence_as(
      call, [next(it) if _is_array(leaf) else leaf
             for leaf in keras.tree.flatten(call)])


def _grad_sums(objective, own_values, samples, n, chunk, f):
  """`Σ_k f(∂ objective(own_values, sample_k) / ∂ own_values)`, mapped over
  the samples `chunk` at a time."""

  def per_chunk(part):
    grads = jax.vmap(lambda s: jax.grad(objective)(own_values, s))(part)
    return [ops.sum(f(ops.cast(g, "float32")), axis=0) for g in grads]

  return _chunked_sums(per_chunk, samples, n, chunk,
                       [jnp.zeros(v.shape, "float32") for v in own_values])


def global_step(model, per_sample, objective, transform, labels="none",
                output_fn=None, seed=0):
  """A compiled `(trainable, non_trainable, batch) -> (sums, labels_ok)`.

  Args:
    model: a built `keras.Model`.
    per_sample: exact per-sample sums, or the batch's summed gradient
      transformed (the approximation of `mas(per_sample=False)`).
    objective: `(outputs, y) -> ` a sum of per-sample terms.
    transform: `"abs"` (MAS) or `"square"` (Fisher).
    labels: `"none"` (MAS), `"given"` (empirical Fisher: the batch's labels,
      checked to index the logits) or `"sampled"` (true Fisher: drawn from
      the model's predictive distribution, seeded by `seed` and the batch
      size, as TensorFlow's `stateless_categorical` is).
    output_fn: selects the logits, for the label check and sampling.
    seed: the seed of sampled labels.

  Returns:
    The compiled step; `labels_ok` is False when a given label is out of
    range.
  """
  variables = list(model.trainable_variables)
  f = _TRANSFORMS[transform]
  dense_units = (_functional.dense_units(model, variables) if per_sample
                 else None)
  units, rest = (_closed_forms.split(model, variables) if per_sample
                 else ([], variables))
  # The variables no closed form covers: mapped gradients of the model.
  rest_ids = {id(v) for v in rest}
  rest_index = [i for i, v in enumerate(variables) if id(v) in rest_ids]
  chunk = _functional.chunk(rest)

  def loss(trainable, non_trainable, x, y):
    return objective(_outputs(model, trainable, non_trainable, x), y)

  def rest_sums(trainable, non_trainable, x, y):
    def rest_loss(values, x_k, y_k):
      full = list(trainable)
      for i, value in zip(rest_index, values):
        full[i] = value
      return loss(full, non_trainable, _one(x_k),
                  None if y_k is None else _one(y_k))

    def per_chunk(part):
      xs, ys = part
      grads = jax.vmap(lambda x_k, y_k: jax.grad(rest_loss)(
          [trainable[i] for i in rest_index], x_k, y_k))(xs, ys)
      return [ops.sum(f(ops.cast(g, "float32")), axis=0) for g in grads]

    zeros = [jnp.zeros(v.shape, "float32") for v in rest]
    return dict(zip((id(v) for v in rest), _chunked_sums(
        per_chunk, (x, y), _batch_size(x), chunk, zeros)))

  def step(trainable, non_trainable, batch):
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    ok = jnp.array(True)
    if labels == "given":
      # Only the static shape is read: XLA drops the computation.
      classes = _functional.logits(
          _outputs(model, trainable, non_trainable, x), output_fn).shape[-1]
      flat = ops.reshape(y, (-1,))
      ok = jnp.all((flat >= 0) & (flat < classes))
    elif labels == "sampled":
      logits = _functional.logits(
          _outputs(model, trainable, non_trainable, x), output_fn)
      key = jax.random.fold_in(jax.random.key(seed), logits.shape[0])
      y = jax.lax.stop_gradient(
          jax.random.categorical(key, logits, axis=-1).astype("int32"))
    if not per_sample:
      grads = jax.grad(loss)(trainable, non_trainable, x, y)
      return [f(ops.cast(g, "float32")) for g in grads], ok
    if dense_units is not None:
      sums = _dense_sums(model, dense_units, objective, f, trainable,
                         non_trainable, x, y)
      if sums is not None:
        return sums, ok
    sums = {}
    if units:
      sums.update(_closed_form_sums(model, units, objective, f, trainable,
                                    non_trainable, x, y))
    if rest:
      sums.update(rest_sums(trainable, non_trainable, x, y))
    return [sums[id(v)] for v in variables], ok

  return jax.jit(step)


def local_step(model, output_fn):
  """A compiled `(trainable, non_trainable, batch) -> (sums, True)` of local
  MAS (`_functional.local_sums`).

  Raises (when called):
    ValueError: if `output_fn` is given but no layer with weights produces
      the model's output.
  """
  units = per_sample_lib.plan(model, list(model.trainable_variables))

  def step(trainable, non_trainable, batch):
    x = batch[0]
    base = _functional.state_pairs(model, trainable, non_trainable)
    return _functional.local_sums(model, units, output_fn, base, x,
                                  _batch_size(x), _mapped_abs_grad_sums), (
                                      jnp.array(True))

  return jax.jit(step)


def _mapped_abs_grad_sums(objective, own_values, samples, n, chunk):
  return _chunked_sums(_abs_grad_sums(objective, own_values), samples, n,
                       chunk, [jnp.zeros(v.shape, "float32")
                               for v in own_values])


def _abs_grad_sums(objective, own_values):
  """A chunk's `Σ_k |∂ objective(own_values, sample_k) / ∂ own_values|`."""

  def per_chunk(part):
    grads = jax.vmap(lambda s: jax.grad(objective)(own_values, s))(part)
    return [ops.sum(jnp.abs(ops.cast(g, "float32")), axis=0) for g in grads]

  return per_chunk


def placed(batch):
  """`batch` sharded on the batch axis of the `keras.distribution` in
  effect, as Keras's JAX trainer places a training batch (each device
  computes its samples' gradients against its shards of the weights);
  unplaced without a distribution, or where the batch does not divide
  among the batch axis's devices (a last, smaller batch: replicated).
  Across processes each gives its own rows of the batch every process
  holds (`multi_process.local_part`), as Keras shards `fit`'s dataset."""
  distribution = keras.distribution.distribution()
  if distribution is None:
    return batch
  mesh = distribution.device_mesh
  axis = distribution.batch_dim_name
  devices = (mesh.shape[list(mesh.axis_names).index(axis)]
             if axis in mesh.axis_names else 1)
  size = int(_batch_size(batch[0]))
  if size % devices:
    return batch  # Every process gives the whole batch: replicated.
  batch = multi_process.local_part(batch, size)
  return jax_trainer._distribute_data(batch)  # pylint: disable=protected-access


def run(model, step, dataset):
  """Sums `step` over the batches of `dataset`.

  Args:
    model: the model whose variables' current values `step` reads.
    step: a compiled step of `global_step` or `local_step`.
    dataset: batches of `(x,)` or `(x, y)` (a `tf.data.Dataset` or
      `_data.as_dataset`'s array batches).

  Returns:
    `(totals, count)`: the sums, one per trainable variable, and the number
    of samples.

  Raises:
    LabelsOutOfRange: if a label does not index the logits.
  """
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  totals, count = None, 0
  for batch in dataset:
    batch = tuple(tf.nest.map_structure(np.asarray, tuple(batch)))
    # Across processes each gives its own samples of the global batch.
    global_batch = placed(batch)
    sums, ok = step(trainable, non_trainable, global_batch)
    if not bool(ok):
      raise _functional.LabelsOutOfRange(batch[1])
    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    count += int(_batch_size(global_batch[0]))
  if totals is None:
    totals = [jnp.zeros(v.shape, "float32") for v in model.trainable_variables]
  return totals, count
