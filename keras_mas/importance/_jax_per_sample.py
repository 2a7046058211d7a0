"""Exact per-sample importance on Keras's JAX backend.

`keras_mas.importance.estimators` computes, on TensorFlow, `Σ_k f(g_k)` from
per-layer closed forms (`keras_mas.importance.per_sample`). On JAX the same
sums come from `jax.vmap(jax.grad(...))`: the gradient of one sample's
objective, through `stateless_call`, vectorized over the samples of a chunk.
The chunks are sized so that at most `per_sample._CHUNK_VALUES` per-sample
gradient values exist at once, and scanned (`jax.lax.scan`), so memory stays
bounded whatever the batch, as on TensorFlow.

* Global MAS and Fisher: the gradient of the sample's objective (the squared
  norm of the outputs, or the log-likelihood) with respect to all trainable
  variables. When every trainable variable belongs to a plain `Dense` layer
  called once on `(batch, features)` inputs (the main job's MLP), the closed
  form instead, as TensorFlow's `per_sample.DenseUnit`: one batched pass
  gives each layer's inputs `a` and, through a zero probe added to its
  pre-activation, each sample's gradient `δ` there (samples are independent
  in inference mode); then `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)` for f = |·| or
  (·)². 30× faster than the mapped gradients on that MLP.
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
import numpy as np
import tensorflow as tf

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
  refs = list(model.trainable_variables) + list(model.non_trainable_variables)
  base = list(zip(refs, list(trainable) + list(non_trainable)))
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
  chunk = _functional.chunk(variables)
  dense_units = (_functional.dense_units(model, variables) if per_sample
                 else None)

  def loss(trainable, non_trainable, x, y):
    return objective(_outputs(model, trainable, non_trainable, x), y)

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

    def per_chunk(part):
      xs, ys = part

      def one(x_k, y_k):
        return jax.grad(loss)(trainable, non_trainable, _one(x_k),
                              None if y_k is None else _one(y_k))

      grads = jax.vmap(one)(xs, ys)
      return [ops.sum(f(ops.cast(g, "float32")), axis=0) for g in grads]

    zeros = [jnp.zeros(v.shape, "float32") for v in variables]
    return _chunked_sums(per_chunk, (x, y), _batch_size(x), chunk,
                         zeros), ok

  return jax.jit(step)


def local_step(model, output_fn):
  """A compiled `(trainable, non_trainable, batch) -> (sums, True)` of local
  MAS: each layer's own output norm, its own variables, inputs fixed.

  Raises (when called):
    ValueError: if `output_fn` is given but no layer with weights produces
      the model's output.
  """
  variables = list(model.trainable_variables)
  units = per_sample_lib.plan(model, variables)
  layer_units = [u for u in units if u.layer is not None]
  model_units = [u for u in units if u.layer is None]
  refs = list(model.trainable_variables) + list(model.non_trainable_variables)

  def norm(outputs):
    return ops.sum(_functional.squared_output_norm(outputs))

  def step(trainable, non_trainable, batch):
    x = batch[0]
    n = _batch_size(x)
    values = dict(zip((id(v) for v in refs),
                      list(trainable) + list(non_trainable)))
    base = [(v, values[id(v)]) for v in refs]
    records = {}
    with keras.StatelessScope(state_mapping=base):
      with _functional.recording(layer_units, records):
        outputs = keras.tree.flatten(model(x, training=False))
    sums, found_output = {}, False
    for unit in layer_units:
      unit_records = records[unit]
      if not unit_records:
        continue  # Not on the path from these inputs: importance stays 0.
      layer = unit.layer
      own = list(unit.variables)
      own_ids = {id(v) for v in own}
      others = [(v, value) for v, value in base if id(v) not in own_ids]
      outputs_of_model = [any(r.output is o for o in outputs)
                          for r in unit_records]
      if output_fn is not None and any(outputs_of_model):
        found_output = True
      # Each record's tensors with the batch axis are mapped over; the
      # rest (flags, masks of another shape) are passed as they are.
      flat = [jax.tree_util.tree_flatten(r.args) for r in unit_records]
      mapped = [[_is_batched(leaf, n) for leaf in leaves]
                for leaves, _ in flat]
      batched = [[leaf for leaf, m in zip(leaves, marks) if m]
                 for (leaves, _), marks in zip(flat, mapped)]

      def objective(own_values, samples, flat=flat, mapped=mapped,
                    layer=layer, own=own, others=others,
                    outputs_of_model=outputs_of_model):
        total = jnp.zeros((), "float32")
        with keras.StatelessScope(
            state_mapping=others + list(zip(own, own_values))):
          # pylint: disable-next=protected-access
          with per_sample_lib._as_called(layer):
            for (leaves, tree), marks, sample, is_output in zip(
                flat, mapped, samples, outputs_of_model):
              it = iter(sample)
              args, kwargs = jax.tree_util.tree_unflatten(
                  tree, [next(it)[None] if m else leaf
                         for leaf, m in zip(leaves, marks)])
              output = type(layer).call(layer, *args, **kwargs)
              if output_fn is not None and is_output:
                output = output_fn(output)
              total = total + norm(output)
        return total

      own_values = [values[id(v)] for v in own]
      totals = _chunked_sums(_abs_grad_sums(objective, own_values), batched,
                             n, _functional.chunk(own),
                             [jnp.zeros(v.shape, "float32") for v in own])
      sums.update(zip((id(v) for v in own), totals))
    if output_fn is not None and not found_output:
      raise _functional.missing_output_error(model, output_fn)
    for unit in model_units:
      # The model's own weights: its whole output, per sample.
      own = list(unit.variables)
      own_ids = {id(v) for v in own}

      def model_objective(own_values, x_k, own=own, own_ids=own_ids):
        mapping = [(v, value) for v, value in base if id(v) not in own_ids]
        with keras.StatelessScope(
            state_mapping=mapping + list(zip(own, own_values))):
          return norm(model(_one(x_k), training=False))

      own_values = [values[id(v)] for v in own]
      totals = _chunked_sums(_abs_grad_sums(model_objective, own_values), x,
                             n, _functional.chunk(own),
                             [jnp.zeros(v.shape, "float32") for v in own])
      sums.update(zip((id(v) for v in own), totals))
    return [sums.get(id(v), jnp.zeros(v.shape, "float32"))
            for v in variables], jnp.array(True)

  return jax.jit(step)


def _abs_grad_sums(objective, own_values):
  """A chunk's `Σ_k |∂ objective(own_values, sample_k) / ∂ own_values|`."""

  def per_chunk(part):
    grads = jax.vmap(lambda s: jax.grad(objective)(own_values, s))(part)
    return [ops.sum(jnp.abs(ops.cast(g, "float32")), axis=0) for g in grads]

  return per_chunk


def _is_batched(leaf, n):
  return (isinstance(leaf, jax.Array) and leaf.ndim >= 1
          and leaf.shape[0] == n)


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
    sums, ok = step(trainable, non_trainable, batch)
    if not bool(ok):
      raise _functional.LabelsOutOfRange(batch[1])
    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    count += int(_batch_size(batch[0]))
  if totals is None:
    totals = [jnp.zeros(v.shape, "float32") for v in model.trainable_variables]
  return totals, count
