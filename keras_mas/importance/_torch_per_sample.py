"""Exact per-sample importance on Keras's PyTorch backend.

The sums `Σ_k f(g_k)` that TensorFlow forms from per-layer closed forms
(`keras_mas.importance.per_sample`) come here from `torch.func`, as on JAX
from `jax.vmap(jax.grad(...))` (`_jax_per_sample`, whose structure this
follows; the shared parts are `_functional`):

* Global MAS and Fisher: `torch.func.vmap(torch.func.grad(...))` of one
  sample's objective through `stateless_call`, in chunks of at most
  `per_sample._CHUNK_VALUES` per-sample gradient values, so memory stays
  bounded. When every trainable variable belongs to a plain `Dense` layer
  called once on `(batch, features)` inputs (the main job's MLP), the closed
  form instead: autograd's gradient at a zero probe added to each
  pre-activation gives every sample's `δ`, and `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)`.
* Local MAS: each layer's calls are recorded during one forward pass; then
  the per-sample gradient of the squared norm of the layer's own output
  with respect to its own variables, its recorded inputs held fixed.

The steps run eagerly (PyTorch's Keras trainer compiles nothing by default)
on the variables' current values, detached from autograd's graph.
"""

import contextlib

import keras
from keras import ops
from keras.src.backend.torch import nn as torch_nn
import numpy as np
import tensorflow as tf
import torch

from keras_mas.importance import _functional
from keras_mas.importance import per_sample as per_sample_lib

__all__ = ["global_step", "local_step", "run"]

_TRANSFORMS = {"abs": torch.abs, "square": torch.square}


def _outputs(model, trainable, non_trainable, x):
  """The model's outputs, padding positions zeroed."""
  outputs, _ = model.stateless_call(trainable, non_trainable, x,
                                    training=False)
  return _functional.masked(outputs, x)


def _batch_size(x):
  return next(t for t in keras.tree.flatten(x) if t is not None).shape[0]


def _one(tree):
  """One sample (no batch axis) as a batch of one."""
  return keras.tree.map_structure(
      lambda t: None if t is None else t[None], tree)


def _chunked_sums(per_chunk, tree, n, chunk, zeros):
  """`Σ per_chunk(part)` over the parts of `tree`'s `n` samples, `chunk` at a
  time; `zeros` shaped like `per_chunk`'s list of sums."""
  totals = list(zeros)
  for start in range(0, n, chunk):
    part = keras.tree.map_structure(
        lambda t, s=start: None if t is None else t[s:s + chunk], tree)
    totals = [t + s for t, s in zip(totals, per_chunk(part))]
  return totals


def _zeros(variables):
  return [torch.zeros(tuple(v.shape), dtype=torch.float32)
          for v in variables]


def _dense_sums(model, units, objective, f, trainable, non_trainable, x, y):
  """Per-sample sums by the Dense closed form (`_functional.probed_forward`),
  or None where a unit is not called exactly once on rank-2 inputs."""
  refs = list(model.trainable_variables) + list(model.non_trainable_variables)
  base = list(zip(refs, list(trainable) + list(non_trainable)))
  probes = {}

  def probe(i, z):
    # Created at the unit's first call, shaped like its pre-activation.
    probes.setdefault(i, []).append(
        torch.zeros(tuple(z.shape), dtype=torch.float32, requires_grad=True))
    return probes[i][-1]

  inputs = [[] for _ in units]
  with torch.enable_grad():
    outputs = _functional.probed_forward(model, units, base, x, probe, inputs)
    if any(len(calls) != 1 or len(calls[0].shape) != 2 for calls in inputs):
      return None
    deltas = torch.autograd.grad(objective(outputs, y),
                                 [probes[i][0] for i in range(len(units))])
  return _functional.dense_sums(model, units, f,
                                [calls[0].detach() for calls in inputs], deltas)


def global_step(model, per_sample, objective, transform, labels="none",
                output_fn=None, seed=0):
  """A `(trainable, non_trainable, batch) -> (sums, labels_ok)` step.

  Args: as `_jax_per_sample.global_step`; sampled labels are drawn by a
  `torch.Generator` seeded with `seed` and the batch size.
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
    if labels == "given":
      classes = _functional.logits(
          _outputs(model, trainable, non_trainable, _one_of(x)),
          output_fn).shape[-1]
      flat = torch.reshape(y, (-1,))
      if not bool(torch.all((flat >= 0) & (flat < classes))):
        return None, False
    elif labels == "sampled":
      logits = _functional.logits(
          _outputs(model, trainable, non_trainable, x), output_fn)
      generator = torch.Generator().manual_seed(
          int(seed) * 1_000_003 + int(logits.shape[0]))
      y = torch.multinomial(torch.softmax(logits, dim=-1), 1,
                            generator=generator)[:, 0].to(torch.int32)
    if not per_sample:
      grads = torch.func.grad(loss)(trainable, non_trainable, x, y)
      return [f(ops.cast(g, "float32")) for g in grads], True
    if dense_units is not None:
      sums = _dense_sums(model, dense_units, objective, f, trainable,
                         non_trainable, x, y)
      if sums is not None:
        return sums, True

    def one(x_k, y_k):
      return torch.func.grad(loss)(trainable, non_trainable, _one(x_k),
                                   None if y_k is None else _one(y_k))

    def per_chunk(part):
      xs, ys = part
      grads = torch.func.vmap(one, in_dims=(0, None if ys is None else 0))(
          xs, ys)
      return [torch.sum(f(ops.cast(g, "float32")), dim=0) for g in grads]

    return _chunked_sums(per_chunk, (x, y), _batch_size(x), chunk,
                         _zeros(variables)), True

  return _no_grad(step)


def _one_of(x):
  """The first sample of `x`, batched: enough to read the logits' width."""
  return keras.tree.map_structure(
      lambda t: None if t is None else t[:1], x)


def local_step(model, output_fn):
  """A `(trainable, non_trainable, batch) -> (sums, True)` step of local MAS:
  each layer's own output norm, its own variables, inputs fixed.

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
      flat = [keras.tree.flatten(r.args) for r in unit_records]
      mapped = [[_is_batched(leaf, n) for leaf in leaves] for leaves in flat]
      batched = [[leaf for leaf, m in zip(leaves, marks) if m]
                 for leaves, marks in zip(flat, mapped)]

      def objective(own_values, samples, records=unit_records, flat=flat,
                    mapped=mapped, layer=layer, own=own, others=others,
                    outputs_of_model=outputs_of_model):
        total = torch.zeros((), dtype=torch.float32)
        with keras.StatelessScope(
            state_mapping=others + list(zip(own, own_values))):
          # pylint: disable-next=protected-access
          with per_sample_lib._as_called(layer):
            for record, leaves, marks, sample, is_output in zip(
                records, flat, mapped, samples, outputs_of_model):
              it = iter(sample)
              args, kwargs = keras.tree.pack_sequence_as(
                  record.args, [next(it)[None] if m else leaf
                                for leaf, m in zip(leaves, marks)])
              output = type(layer).call(layer, *args, **kwargs)
              if output_fn is not None and is_output:
                output = output_fn(output)
              total = total + norm(output)
        return total

      own_values = [values[id(v)] for v in own]
      totals = _chunked_sums(_abs_grad_sums(objective, own_values), batched,
                             n, _functional.chunk(own), _zeros(own))
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
                             n, _functional.chunk(own), _zeros(own))
      sums.update(zip((id(v) for v in own), totals))
    zeros = _zeros(variables)
    return [sums.get(id(v), z) for v, z in zip(variables, zeros)], True

  return _no_grad(step)


def _abs_grad_sums(objective, own_values):
  """A chunk's `Σ_k |∂ objective(own_values, sample_k) / ∂ own_values|`."""

  def per_chunk(part):
    grads = torch.func.vmap(
        lambda s: torch.func.grad(objective)(own_values, s))(part)
    return [torch.sum(torch.abs(ops.cast(g, "float32")), dim=0)
            for g in grads]

  return per_chunk


def _is_batched(leaf, n):
  return (isinstance(leaf, torch.Tensor) and leaf.ndim >= 1
          and leaf.shape[0] == n)


def _no_grad(step):
  """`step` outside autograd's graph (`torch.func.grad` and the closed
  form's `enable_grad` differentiate what they need), its convolutions
  mappable by `torch.func.vmap` (`_keeping_memory_format`)."""

  def run_step(*args):
    with torch.no_grad(), _keeping_memory_format():
      return step(*args)

  return run_step


@contextlib.contextmanager
def _keeping_memory_format():
  """Keras's PyTorch convolutions copy their inputs and kernels into the
  channels-last memory format, a layout for speed that `torch.func.vmap`
  cannot map ("NYI: Tensor.clone(memory_format) inside vmap"); the values
  are the same in either layout, so the copy is skipped while mapping."""
  name = "_maybe_convert_to_channels_last"
  original = getattr(torch_nn, name, None)
  if original is None:
    yield
    return
  setattr(torch_nn, name, lambda tensor: tensor)
  try:
    yield
  finally:
    setattr(torch_nn, name, original)


def run(model, step, dataset):
  """Sums `step` over the batches of `dataset`.

  Args:
    model: the model whose variables' current values `step` reads.
    step: a step of `global_step` or `local_step`.
    dataset: batches of `(x,)` or `(x, y)` (a `tf.data.Dataset` or
      `_data.as_dataset`'s array batches).

  Returns:
    `(totals, count)`: the sums, one per trainable variable, and the number
    of samples.

  Raises:
    LabelsOutOfRange: if a label does not index the logits.
  """
  trainable = [v.value.detach() for v in model.trainable_variables]
  non_trainable = [v.value.detach() for v in model.non_trainable_variables]
  totals, count = None, 0
  for batch in dataset:
    batch = tuple(tf.nest.map_structure(
        lambda t: ops.convert_to_tensor(np.asarray(t)), tuple(batch)))
    sums, ok = step(trainable, non_trainable, batch)
    if not ok:
      raise _functional.LabelsOutOfRange(batch[1])
    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    count += int(_batch_size(batch[0]))
  if totals is None:
    totals = _zeros(model.trainable_variables)
  return totals, count
