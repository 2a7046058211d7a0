"""What JAX's and PyTorch's per-sample importance share, in `keras.ops`.

On TensorFlow, `keras_mas.importance.estimators` forms per-sample sums from
per-layer closed forms (`per_sample`). On JAX (`_jax_per_sample`) and PyTorch
(`_torch_per_sample`) they come from function transforms, `vmap(grad(...))`
over `stateless_call`; here are the parts that do not depend on which: the
objectives, chunk sizes, the `Dense` closed form's probed forward pass, and
the recording of a layer's calls for local MAS.
"""

import contextlib
import math

import keras
from keras import ops

from keras_mas.importance import per_sample as per_sample_lib

__all__ = ["LabelsOutOfRange", "chunk", "dense_sums", "dense_units",
           "fisher_objective", "local_sums", "logits", "masked",
           "output_norm", "probed_forward", "recording",
           "squared_output_norm", "state_pairs"]

_CHUNK_VALUES = per_sample_lib._CHUNK_VALUES  # pylint: disable=protected-access


class LabelsOutOfRange(ValueError):
  """A label of `fisher`'s data is not an index of the logits."""


def squared_output_norm(outputs):
  """Per-sample `‖outputs‖²`, all outputs concatenated, in float32."""
  flat = [ops.reshape(ops.cast(o, "float32"), (o.shape[0], -1))
          for o in keras.tree.flatten(outputs)]
  return ops.sum(ops.square(ops.concatenate(flat, axis=1)), axis=1)


def output_norm(output_fn):
  """MAS's objective `Σ_k ‖F(x_k)‖²`; labels unused."""

  def objective(outputs, y):
    del y
    if output_fn is not None:
      outputs = output_fn(outputs)
    return ops.sum(squared_output_norm(outputs))

  return objective


def fisher_objective(output_fn):
  """The log-likelihood `Σ_k log p(y_k | x_k)` of a softmax over logits."""

  def objective(outputs, y):
    labels = ops.cast(ops.reshape(y, (-1,)), "int32")
    log_p = ops.log_softmax(logits(outputs, output_fn), axis=-1)
    return ops.sum(ops.take_along_axis(log_p, labels[:, None], axis=-1))

  return objective


def logits(outputs, output_fn):
  return ops.cast(output_fn(outputs) if output_fn else outputs, "float32")


def masked(outputs, x):
  """`outputs` with the positions of a `padding_mask` input zeroed (see
  `estimators._call_model`)."""
  mask = x.get("padding_mask") if isinstance(x, dict) else None
  if (mask is not None and not isinstance(outputs, (list, tuple, dict))
      and len(outputs.shape) == 3 and len(mask.shape) == 2):
    outputs = outputs * ops.cast(mask, outputs.dtype)[:, :, None]
  return outputs


def chunk(variables):
  """Samples per chunk: at most `per_sample._CHUNK_VALUES` per-sample
  gradient values exist at once."""
  size = sum(math.prod(v.shape) for v in variables)
  return max(1, _CHUNK_VALUES // max(1, size))


def dense_units(model, variables):
  """The units of `per_sample.plan` when all are plain, LoRA-free `Dense`
  layers (the closed form's case), else None."""
  units = per_sample_lib.plan(model, variables)
  if units and all(type(u) is per_sample_lib.DenseUnit  # pylint: disable=unidiomatic-typecheck
                   and not u.layer.lora_enabled for u in units):
    return units
  return None


def probed_forward(model, units, base, x, probe, inputs):
  """The model's outputs in inference mode, with `probe(i, z)` added to
  each unit's pre-activation `z` (None: nothing added); each unit's inputs
  are appended to `inputs[i]`.

  The `Dense` closed form: the gradient with respect to a zero probe is each
  sample's gradient `δ` at the pre-activation (samples are independent in
  inference mode), and `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)`.
  """
  with contextlib.ExitStack() as stack:
    stack.enter_context(keras.StatelessScope(state_mapping=base))
    for i, unit in enumerate(units):
      layer = unit.layer

      def call(a, *args, _layer=layer, _i=i, **kwargs):
        # pylint: disable-next=protected-access
        with per_sample_lib._without_activation(_layer) as activation:
          z = type(_layer).call(_layer, a, *args, **kwargs)
        if probe is not None:
          z = z + ops.cast(probe(_i, z), z.dtype)
        inputs[_i].append(a)
        return activation(z) if activation is not None else z

      # pylint: disable-next=protected-access
      stack.enter_context(per_sample_lib._replaced_call(layer, call))
    outputs = model(x, training=False)
  return masked(outputs, x)


def dense_sums(model, units, f, inputs, deltas):
  """`f(A)ᵀ f(Δ)` and `Σ f(Δ)`, one per trainable variable of `model`."""
  sums = {}
  for unit, a, d in zip(units, inputs, deltas):
    layer = unit.layer
    a, d = f(ops.cast(a, "float32")), f(ops.cast(d, "float32"))
    # pylint: disable-next=protected-access
    sums[id(per_sample_lib._kernel(layer))] = ops.matmul(ops.transpose(a), d)
    if layer.bias is not None:
      sums[id(layer.bias)] = ops.sum(d, axis=0)
  return [sums[id(v)] for v in model.trainable_variables]


class Record:
  """One call of a layer: its arguments `(args, kwargs)` and its output."""
  __slots__ = ("args", "output")

  def __init__(self, args, output):
    self.args, self.output = args, output


@contextlib.contextmanager
def recording(units, records):
  """Records each unit's layer's calls into `records[unit]` (`Record`s)."""
  with contextlib.ExitStack() as stack:
    for unit in units:
      records[unit] = []
      layer = unit.layer
      original = layer.call

      def call(*args, _original=original, _records=records[unit], **kwargs):
        output = _original(*args, **kwargs)
        _records.append(Record((args, kwargs), output))
        return output

      # pylint: disable-next=protected-access
      stack.enter_context(per_sample_lib._replaced_call(layer, call))
    yield


def local_sums(model, units, output_fn, base, x, n, abs_grad_sums):
  """Local MAS's per-sample sums over the batch `x`, one per trainable
  variable of `model`: for each unit of `per_sample.plan`, the gradient of
  the squared norm of its layer's own output with respect to its own
  variables, the layer's recorded inputs held fixed; a unit without a layer
  (the model's own weights) takes the whole output.

  Args:
    model: the model.
    units: `per_sample.plan(model, model.trainable_variables)`.
    output_fn: applied to the output of the layer that produces the
      model's output, or None.
    base: `(variable, value)` pairs of all the model's variables.
    x: the batch.
    n: its number of samples.
    abs_grad_sums: the backend's `(objective, own_values, samples, n, chunk)
      -> Σ_k |∂ objective(own_values, sample_k) / ∂ own_values|`, mapped over
      the leading axis of each tensor of `samples` in chunks of `chunk`.

  Raises:
    ValueError: if `output_fn` is given but no layer with weights produces
      the model's output.
  """
  layer_units = [u for u in units if u.layer is not None]
  values = {id(v): value for v, value in base}
  records = {}
  with keras.StatelessScope(state_mapping=base):
    with recording(layer_units, records):
      outputs = keras.tree.flatten(model(x, training=False))
  sums, found_output = {}, False
  for unit in layer_units:
    unit_records = records[unit]
    if not unit_records:
      continue  # Not on the path from these inputs: importance stays 0.
    own = list(unit.variables)
    own_ids = {id(v) for v in own}
    outputs_of_model = [any(r.output is o for o in outputs)
                        for r in unit_records]
    found_output = found_output or (output_fn is not None
                                    and any(outputs_of_model))
    # Each record's tensors with the batch axis are mapped over; the rest
    # (flags, masks of another shape) are passed as they are.
    flat = [keras.tree.flatten(r.args) for r in unit_records]
    mapped = [[_is_batched(leaf, n) for leaf in leaves] for leaves in flat]
    batched = [[leaf for leaf, m in zip(leaves, marks) if m]
               for leaves, marks in zip(flat, mapped)]
    objective = _layer_objective(
        unit.layer, own, [(v, value) for v, value in base
                          if id(v) not in own_ids],
        unit_records, flat, mapped, outputs_of_model, output_fn)
    own_values = [values[id(v)] for v in own]
    sums.update(zip((id(v) for v in own), abs_grad_sums(
        objective, own_values, batched, n, chunk(own))))
  if output_fn is not None and not found_output:
    raise missing_output_error(model, output_fn)
  for unit in units:
    if unit.layer is not None:
      continue
    own = list(unit.variables)
    own_ids = {id(v) for v in own}
    others = [(v, value) for v, value in base if id(v) not in own_ids]

    def model_objective(own_values, x_k, own=own, others=others):
      with keras.StatelessScope(
          state_mapping=others + list(zip(own, own_values))):
        return _norm(model(keras.tree.map_structure(
            lambda t: t[None], x_k), training=False))

    own_values = [values[id(v)] for v in own]
    sums.update(zip((id(v) for v in own), abs_grad_sums(
        model_objective, own_values, x, n, chunk(own))))
  return [sums.get(id(v), ops.zeros(v.shape, "float32"))
          for v in model.trainable_variables]


def _layer_objective(layer, own, others, records, flat, mapped,
                     outputs_of_model, output_fn):
  """`(own_values, samples) -> ` the layer's own output norm over one
  sample of each of its recorded calls."""

  def objective(own_values, samples):
    total = ops.zeros((), "float32")
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
          total = total + _norm(output)
    return total

  return objective


def _norm(outputs):
  return ops.sum(squared_output_norm(outputs))


def _is_batched(leaf, n):
  return (ops.is_tensor(leaf) and len(leaf.shape) >= 1
          and leaf.shape[0] == n)


def missing_output_error(model, output_fn):
  return ValueError(
      "Invalid value for argument `output_fn`. Expected a model whose "
      "output is produced by a layer with weights (e.g. a Dense head), "
      "so that the function can select part of that layer's output. "
      f"Received: output_fn={output_fn!r} for model '{model.name}'")


def state_pairs(model, trainable, non_trainable):
  """`(variable, value)` for every variable of `model`, trainable first:
  what a stateless pass reads in place of the variables."""
  refs = list(model.trainable_variables) + list(model.non_trainable_variables)
  return list(zip(refs, list(trainable) + list(non_trainable)))
