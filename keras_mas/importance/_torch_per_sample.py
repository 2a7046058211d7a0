"""Exact per-sample importance on Keras's PyTorch backend.

The sums `Σ_k f(g_k)` that TensorFlow forms from per-layer closed forms
(`keras_mas.importance.per_sample`) come here from the same forms and
`torch.func`, as on JAX (`_jax_per_sample`, whose structure this follows;
the shared parts are `_functional` and `_closed_forms`):

* Global MAS and Fisher: per layer (`_closed_forms`, shared with JAX):
  autograd's gradient at zero probes added to the outputs of the
  convolution, embedding, dense and normalization layers gives every
  sample's `δ` there; each layer's own per-sample gradients follow from its
  recorded inputs (convolutions: each tap's shifted inputs ⊗ `δ`, as
  batched matrix products). Variables of other layers: `torch.func.vmap(
  torch.func.grad(...))` of one sample's objective through `stateless_call`
  with respect to those variables alone, in chunks of at most
  `per_sample._CHUNK_VALUES` per-sample gradient values, so memory stays
  bounded. A model of plain `Dense` layers on `(batch, features)` (the main
  job's MLP) takes `_dense_sums`: `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)`.
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

from keras_mas.importance import _closed_forms
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
  """float32 zeros shaped like `variables`, on Keras's device."""
  return [ops.zeros(tuple(v.shape), "float32") for v in variables]


def _dense_sums(model, units, objective, f, trainable, non_trainable, x, y):
  """Per-sample sums by the Dense closed form (`_functional.probed_forward`),
  or None where a unit is not called exactly once on rank-2 inputs."""
  base = _functional.state_pairs(model, trainable, non_trainable)
  probes = {}

  def probe(i, z):
    # Created at the unit's first call, shaped like its pre-activation.
    probes.setdefault(i, []).append(
        torch.zeros_like(z, dtype=torch.float32, requires_grad=True))
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


def _closed_form_sums(model, units, objective, f, trainable, non_trainable,
                      x, y):
  """`{id(variable): Σ_k f(g_k)}` of the variables of `units`
  (`_closed_forms`): one batched pass, probed, then each layer alone."""
  base = _functional.state_pairs(model, trainable, non_trainable)
  probes = [[] for _ in units]

  def probe(i, z):
    probes[i].append(
        torch.zeros_like(z, dtype=torch.float32, requires_grad=True))
    return probes[i][-1]

  calls = [[] for _ in units]
  with torch.enable_grad():
    outputs = _closed_forms.probed_forward(model, units, base, x, probe,
                                           calls)
    flat = [p for unit_probes in probes for p in unit_probes]
    # A probe off the path to the outputs (another task's head) gets None.
    grads = iter(torch.autograd.grad(objective(outputs, y), flat,
                                     allow_unused=True))
  n = _batch_size(x)
  sums = {}
  for unit, unit_calls, unit_probes in zip(units, calls, probes):
    deltas = [_zero_if_none(next(grads), p) for p in unit_probes]
    sums.update(_closed_forms.unit_sums(
        unit, [_detached(call) for call in unit_calls], deltas, f, base, n,
        _grad_sums, _chunked_sums, _same_padding))
  return sums


def _same_padding(layer, spatial_shape):
  """`(low, high)` per spatial axis: the padding of Keras's PyTorch
  convolution for inputs of `spatial_shape`."""
  return [tuple(torch_nn._compute_padding_length(size, k, s, r))  # pylint: disable=protected-access
          for size, k, s, r in zip(spatial_shape, layer.kernel_size,
                                   layer.strides, layer.dilation_rate)]


def _zero_if_none(grad, like):
  return torch.zeros_like(like) if grad is None else grad


def _detached(tree):
  return keras.tree.map_structure(
      lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _grad_sums(objective, own_values, samples, n, chunk, f):
  """`Σ_k f(∂ objective(own_values, sample_k) / ∂ own_values)`, mapped over
  the samples `chunk` at a time."""

  def per_chunk(part):
    grads = torch.func.vmap(
        lambda s: torch.func.grad(objective)(own_values, s))(part)
    return [torch.sum(f(ops.cast(g, "float32")), dim=0) for g in grads]

  return _chunked_sums(per_chunk, samples, n, chunk, _zeros(own_values))


def global_step(model, per_sample, objective, transform, labels="none",
                output_fn=None, seed=0):
  """A `(trainable, non_trainable, batch) -> (sums, labels_ok)` step.

  Args: as `_jax_per_sample.global_step`; sampled labels are drawn by a
  `torch.Generator` seeded with `seed` and the batch size.
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

    def one(x_k, y_k):
      return torch.func.grad(rest_loss)([trainable[i] for i in rest_index],
                                        x_k, y_k)

    def per_chunk(part):
      xs, ys = part
      grads = torch.func.vmap(one, in_dims=(0, None if ys is None else 0))(
          xs, ys)
      return [torch.sum(f(ops.cast(g, "float32")), dim=0) for g in grads]

    return dict(zip((id(v) for v in rest), _chunked_sums(
        per_chunk, (x, y), _batch_size(x), chunk, _zeros(rest))))

  widths = []  # The logits' width, read from the first batch's first sample.

  def step(trainable, non_trainable, batch):
    x = batch[0]
    y = batch[1] if len(batch) > 1 else None
    if labels == "given":
      if not widths:
        widths.append(_functional.logits(
            _outputs(model, trainable, non_trainable, _one_of(x)),
            output_fn).shape[-1])
      classes = widths[0]
      flat = torch.reshape(y, (-1,))
      if not bool(torch.all((flat >= 0) & (flat < classes))):
        return None, False
    elif labels == "sampled":
      logits = _functional.logits(
          _outputs(model, trainable, non_trainable, x), output_fn)
      generator = torch.Generator(device=logits.device).manual_seed(
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
    sums = {}
    if units:
      sums.update(_closed_form_sums(model, units, objective, f, trainable,
                                    non_trainable, x, y))
    if rest:
      sums.update(rest_sums(trainable, non_trainable, x, y))
    return [sums[id(v)] for v in variables], True

  return _no_grad(step)


def _one_of(x):
  """The first sample of `x`, batched: enough to read the logits' width."""
  return keras.tree.map_structure(
      lambda t: None if t is None else t[:1], x)


def local_step(model, output_fn):
  """A `(trainable, non_trainable, batch) -> (sums, True)` step of local MAS
  (`_functional.local_sums`).

  Raises (when called):
    ValueError: if `output_fn` is given but no layer with weights produces
      the model's output.
  """
  units = per_sample_lib.plan(model, list(model.trainable_variables))

  def step(trainable, non_trainable, batch):
    x = batch[0]
    base = _functional.state_pairs(model, trainable, non_trainable)
    return _functional.local_sums(model, units, output_fn, base, x,
                                  _batch_size(x), _mapped_abs_grad_sums), True

  return _no_grad(step)


def _mapped_abs_grad_sums(objective, own_values, samples, n, chunk):
  return _chunked_sums(_abs_grad_sums(objective, own_values), samples, n,
                       chunk, _zeros(own_values))


def _abs_grad_sums(objective, own_values):
  """A chunk's `Σ_k |∂ objective(own_values, sample_k) / ∂ own_values|`."""

  def per_chunk(part):
    grads = torch.func.vmap(
        lambda s: torch.func.grad(objective)(own_values, s))(part)
    return [torch.sum(torch.abs(ops.cast(g, "float32")), dim=0)
            for g in grads]

  return per_chunk


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
