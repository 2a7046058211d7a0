"""Parameter importance estimators: global MAS, local (Hebbian) MAS, Fisher.

Each estimator is a pure function of a built model and some data. It returns
one float32 tensor per entry of `model.trainable_variables`, in that order and
with the same shapes, and changes no variable of the model: the forward passes
run in inference mode (dropout off, BatchNorm reading its moving statistics).

Exact per-sample importance, `mean_k f(g_k)`, is formed layer by layer
(`keras_mas.importance.per_sample`): one batched forward/backward pass records each
layer's input and output gradient, and each layer with a closed form turns
them into its variables' per-sample gradients (Dense, EinsumDense and so
MultiHeadAttention, convolutions, Embedding, normalization layers); any other
layer alone re-runs its own call one sample at a time. Each batch is one
compiled call that adds into sums kept on the device.
"""

import contextlib
import functools
import math
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_mas import _backend
from keras_mas.importance import _data
from keras_mas.importance import _functional
from keras_mas.importance import per_sample as per_sample_lib

# The backend is fixed when Keras is imported. On JAX and PyTorch,
# per-sample gradients come from function transforms, `vmap(grad(...))`
# (`_jax_per_sample`, `_torch_per_sample`); the other paths are TensorFlow's.
_TF = _backend.TENSORFLOW
# pylint: disable=g-import-not-at-top
if _backend.JAX:
  from keras_mas.importance import _jax_per_sample as _transformed
elif _backend.TORCH:
  from keras_mas.importance import _torch_per_sample as _transformed
# pylint: enable=g-import-not-at-top

__all__ = ["ESTIMATORS", "default_batch_size", "fisher", "local_mas", "mas",
           "path_integral", "squared_output_norm", "uniform"]

# Compiled functions, kept per model so that importance passes over several
# tasks reuse one trace instead of retracing every time.
_COMPILED = weakref.WeakKeyDictionary()

# Array inputs are batched so that a batch holds about this many input
# values (a power of two of samples, from 32 to 1,024): large batches make
# the per-batch costs vanish, while activations, which grow with the input,
# stay bounded; the per-sample forms bound their own memory
# (`per_sample._CHUNK_VALUES`).
_BATCH_INPUT_VALUES = 1 << 20
_BATCH_RANGE = (32, 1024)
# And at most this many output values: the outputs, their gradients and
# the activations beside them grow with it (a language model's logits).
_BATCH_OUTPUT_VALUES = 1 << 24


def default_batch_size(data, model=None):
  """The batch size used for array `data` when none is given.

  A power of two of samples from 32 to 1,024 holding about a million input
  values; with `model`, also at most about 16 million output values, down to
  one sample: a language model's logits (sequence × vocabulary per sample)
  then bound the batch, as they bound its training batch.

  Args:
    data: the arrays (or `tf.TensorSpec`s), batch first.
    model: the model whose outputs the batch produces, if known.

  Returns:
    The number of samples per batch.
  """
  per_sample, longest = 1, 1
  for t in tf.nest.flatten(data):
    shape = getattr(t, "shape", None)
    if shape is not None and len(shape) > 1:
      per_sample += math.prod(int(d or 1) for d in shape[1:])
      longest = max([longest] + [int(d or 1) for d in shape[1:]])
  batch = _BATCH_RANGE[0]
  while batch * 2 <= _BATCH_RANGE[1] and batch * 2 * per_sample <= (
      _BATCH_INPUT_VALUES):
    batch *= 2
  outputs = _output_values(model, longest)
  while batch > 1 and batch * outputs > _BATCH_OUTPUT_VALUES:
    batch //= 2
  return batch


def _output_values(model, longest):
  """Output values per sample of `model`, an axis of unknown length (a
  sequence) taken as long as the longest input axis."""
  # A model wrapping another (`WrappedMASModel`) has the inner one's outputs.
  outputs = (getattr(model, "outputs", None)
             or getattr(getattr(model, "model", None), "outputs", None) or [])
  total = 0
  for output in outputs:
    total += math.prod(longest if d is None else int(d)
                       for d in output.shape[1:])
  return total


def squared_output_norm(outputs):
  """Per-sample squared L2 norm of a model's outputs, concatenated, in float32.

  Args:
    outputs: a tensor or a nested structure of tensors, batch-major.

  Returns:
    A float32 tensor of shape `(batch,)`.
  """
  flat = [
      tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1])
      for o in tf.nest.flatten(outputs)
  ]
  return tf.reduce_sum(tf.square(tf.concat(flat, axis=1)), axis=1)


def mas(model, data, per_sample=True, num_samples=None, batch_size=None,
        output_fn=None):
  """Global MAS importance (Aljundi et al. 2018, eq. 2-3).

  `Ω = (1/N) Σ_k |∂‖F(x_k)‖²₂ / ∂θ|`: the gradient of the squared L2 norm of
  the model's output, its absolute value taken per sample, then averaged over
  the `N` samples. Labels are never used.

  Works on any built model whose layers are differentiable: layers with a
  closed per-sample form (`per_sample.CLOSED_FORM_LAYERS`) cost about one
  batched pass; any other layer alone is re-run one sample at a time.

  Example:

  ```python
  omega = keras_mas.importance.mas(model, x_unlabeled, num_samples=500)
  ```

  Args:
    model: a built `keras.Model`.
    data: a batched `tf.data.Dataset` (elements `x`, `(x, y)` or
      `(x, y, sample_weight)`; only `x` is used) or an array of inputs.
    per_sample: `True` (default) for the exact definition. `False` for the
      cheaper approximation of the paper's 2018 code and of Avalanche,
      `Σ_batches |Σ_k g_k| / N`, which lets gradients of opposite sign in a
      batch cancel and so underestimates importance.
    num_samples: use at most this many samples of `data`.
    batch_size: batch size when `data` is an array; by default a power of
      two from 32 to 1,024 holding about a million input values, fewer where
      the outputs are large, as a language model's logits
      (`default_batch_size`).
    output_fn: optional function applied to the model's outputs before the
      norm, e.g. to measure one task head of a multi-head model.

  Returns:
    A list of float32 tensors, one per `model.trainable_variables`.

  Raises:
    ValueError: if the model is not built, `data` is empty or does not fit
      the model, or another argument is invalid.
  """
  variables = _check_model(model)
  if not isinstance(per_sample, bool):
    raise ValueError(
        "Invalid value for argument `per_sample`. Expected True or False. "
        f"Received: per_sample={per_sample!r}"
    )
  key = ("mas", per_sample, output_fn)
  if not _TF:
    step = _compiled(model, key, lambda: _transformed.global_step(
        model, per_sample, _functional.output_norm(output_fn), "abs"))
  else:
    step = _compiled(model, key, lambda: _make_global_step(
        model, per_sample, _output_norm(output_fn), tf.abs))
  return _average(model, key, step, variables, data, batch_size, num_samples)


def local_mas(model, data, num_samples=None, batch_size=None, output_fn=None):
  """Local MAS importance (l-MAS): Hebb's rule, generalised.

  For every layer, the per-sample absolute gradient of the squared L2 norm of
  *that layer's own output* with respect to *its own parameters*, the layer's
  input held fixed, averaged over samples. For a ReLU Dense unit
  `y_j = relu(Σ_i θ_ij y_i)` this is `2·|y_i·y_j|`: the co-activation of the
  two neurons. No gradient flows between layers. A layer without a closed
  form (see `mas`) is one unit: its whole output, its own variables.

  Example:

  ```python
  omega = keras_mas.importance.local_mas(model, x_unlabeled)
  ```

  Args:
    model: a built `keras.Model`.
    data: as for `mas`.
    num_samples: use at most this many samples of `data`.
    batch_size: batch size when `data` is an array.
    output_fn: applied to the output of the layer that produces the model's
      output before its norm, e.g. to measure one task's head
      (`keras_mas.core.heads.OutputSlice`): outputs of other tasks then get no
      importance.

  Returns:
    A list of float32 tensors, one per `model.trainable_variables`.

  Raises:
    ValueError: if `output_fn` is given but no layer with weights produces
      the model's output, or as for `mas`.
  """
  variables = _check_model(model)
  key = ("local_mas", output_fn)
  if not _TF:
    step = _compiled(model, key,
                     lambda: _transformed.local_step(model, output_fn))
  else:
    step = _compiled(model, key,
                     lambda: _make_local_step(model, variables, output_fn))
  return _average(model, key, step, variables, data, batch_size, num_samples)


def fisher(model, data, empirical=True, num_samples=None, batch_size=None,
           output_fn=None, seed=0):
  """Diagonal Fisher information, the importance of EWC (Kirkpatrick 2017).

  `F = (1/N) Σ_k (∂ log p(y_k | x_k) / ∂θ)²`, per-sample squared gradients of
  the log-likelihood of a softmax classifier over the model's logits.

  Args:
    model: a built `keras.Model` producing logits.
    data: `(x, y)` arrays or a batched dataset of `(x, y)` when `empirical`
      (labels are output indices after `output_fn`); inputs alone otherwise.
    empirical: `True` uses the given labels (empirical Fisher); `False`
      samples `y_k` from the model's own predictive distribution (the true
      Fisher, one sample per input).
    num_samples: use at most this many samples.
    batch_size: batch size when `data` holds arrays.
    output_fn: selects the logits of the task, e.g. one head.
    seed: seeds the labels sampled when `empirical=False`.

  Returns:
    A list of float32 tensors, one per `model.trainable_variables`.

  Raises:
    ValueError: if a label is not an index of the logits (the labels are
      named), or as for `mas`.
  """
  variables = _check_model(model)
  key = ("fisher", bool(empirical), output_fn, seed)

  def log_likelihood(outputs, y):
    logits = tf.cast(output_fn(outputs) if output_fn else outputs, tf.float32)
    if empirical:
      labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
      classes = tf.shape(logits)[-1]
      check = tf.debugging.assert_equal(
          tf.reduce_all((labels >= 0) & (labels < classes)), True,
          message=_LABELS_OUT_OF_RANGE)
      # Checked before the loss, whose own error would blame the inputs.
      with tf.control_dependencies([check]):
        labels = tf.identity(labels)
    else:
      labels = tf.stop_gradient(tf.cast(tf.random.stateless_categorical(
          logits, 1, seed=[seed, tf.shape(logits)[0]])[:, 0], tf.int32))
    return -tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))

  if not _TF:
    step = _compiled(model, key, lambda: _transformed.global_step(
        model, True, _functional.fisher_objective(output_fn), "square",
        labels="given" if empirical else "sampled", output_fn=output_fn,
        seed=seed))
  else:
    step = _compiled(model, key, lambda: _make_global_step(
        model, True, log_likelihood, tf.square))
  return _average(model, key, step, variables, data, batch_size, num_samples,
                  labels=bool(empirical))


_LABELS_OUT_OF_RANGE = "fisher: labels out of range"


def uniform(model, data=None, **unused_options):
  """Ω = 1 for every parameter: the plain L2 penalty towards the anchors."""
  del data, unused_options
  ones = tf.ones if _TF else keras.ops.ones
  return [ones(v.shape, "float32") for v in _check_model(model)]


def path_integral(model, data=None, damping=0.1, **unused_options):
  """Synaptic Intelligence importance (Zenke et al. 2017) of the last task.

  `Ω = max(ω, 0) / ((θ − θ_start)² + ξ)` with `ω = Σ_steps −g · Δθ`, the
  path integral of the task-loss gradient along the parameters' trajectory
  since the task started, which `MASModel` accumulates in `train_step` once
  `track_path_integral()` has been called. Data are not used.

  Args:
    model: a `MASModel` tracking its path integral.
    data: ignored.
    damping: ξ > 0.

  Returns:
    A list of float32 tensors, one per `model.trainable_variables`.

  Raises:
    ValueError: if the model does not track its path integral.
  """
  del data, unused_options
  variables = _check_model(model)
  path = getattr(model, "path_integral", None)
  if path is None:
    raise ValueError(
        "Invalid value for argument `model`. Expected a MASModel tracking "
        "its path integral: call `model.track_path_integral()` before the "
        f"task's training. Received: model '{model.name}'")
  by_id = {id(v): (w, s) for v, w, s in zip(path.targets, path.integrals,
                                            path.starts)}
  out = []
  for v in variables:
    w, start = by_id[id(v)]
    if not _TF:
      ops = keras.ops
      # A value, not a function of θ (PyTorch would track its gradient).
      theta = ops.stop_gradient(ops.cast(v.value, "float32"))
      out.append(ops.relu(w.value) / (
          ops.square(theta - start.value) + damping))
    else:
      out.append(tf.nn.relu(tf.convert_to_tensor(w)) / (
          tf.square(tf.cast(v, tf.float32) - start) + damping))
  return out


# --------------------------------------------------------------------------
# Shared machinery.


def _check_model(model):
  if not isinstance(model, keras.Model):
    raise ValueError(
        "Invalid value for argument `model`. Expected a `keras.Model`. "
        f"Received: model of type {type(model).__name__}"
    )
  if not model.built:
    raise ValueError(
        "Invalid value for argument `model`. Expected a built model: call it "
        "on a batch of data or call `model.build(input_shape)` first. "
        f"Received: unbuilt model '{model.name}'"
    )
  variables = list(model.trainable_variables)
  if not variables:
    raise ValueError(
        "Invalid value for argument `model`. Expected a model with trainable "
        f"variables. Received: model '{model.name}' has none"
    )
  return variables


def _compiled(model, key, make):
  per_model = _COMPILED.setdefault(model, {})
  if key not in per_model:
    per_model[key] = make()
  return per_model[key]


def _average(model, key, step, variables, data, batch_size, num_samples,
             labels=False):
  """Sums `step` over the batches of `data`, divides by the sample count.

  On one device each batch of a `tf.data` pipeline is one compiled call,
  the sums kept on the device. Under a `tf.distribute` strategy
  with several replicas (the model's own, or the one in scope), each batch
  is split among the replicas, every replica sums over its share and the
  sums are added across replicas (and workers) before the division by the
  global sample count.
  """
  if batch_size is None:
    batch_size = default_batch_size(data, model)
  if not _TF:
    return _transformed_average(model, step, data, batch_size, num_samples,
                                labels)
  strategy = getattr(model, "distribute_strategy", tf.distribute.get_strategy())
  try:
    if strategy.num_replicas_in_sync > 1:
      totals, count = _distributed_sums(model, key, step, variables, data,
                                        batch_size, num_samples, labels,
                                        strategy)
    else:
      dataset = _data.as_dataset(data, batch_size, num_samples, labels)
      run = _compiled(model, ("run",) + key,
                      lambda: _accumulating(step, variables))
      totals, count = run(dataset)
  except tf.errors.InvalidArgumentError as e:
    if _LABELS_OUT_OF_RANGE in str(e):
      raise _labels_error(model, data) from None
    raise _data_error(model, data, e) from e
  except (ValueError, TypeError, tf.errors.OpError) as e:
    raise _own_or_data_error(model, data, e) from e
  _data.check_count(count, num_samples)
  return [t / count for t in totals]


def _transformed_average(model, step, data, batch_size, num_samples, labels):
  """`_average` on JAX (one compiled call per batch) and PyTorch."""
  try:
    dataset = _data.as_dataset(data, batch_size, num_samples, labels)
    totals, count = _transformed.run(model, step, dataset)
  except _functional.LabelsOutOfRange:
    raise _labels_error(model, data) from None
  except (ValueError, TypeError) as e:
    raise _own_or_data_error(model, data, e) from e
  _data.check_count(count, num_samples)
  return [t / count for t in totals]


def _labels_error(model, data):
  return ValueError(
      "Invalid value for argument `data`. Expected labels that index the "
      f"logits of model '{model.name}' (0 to the number of outputs - 1). "
      f"Received: labels {_label_values(data)}out of that range")


def _own_or_data_error(model, data, error):
  """Our own error raised while tracing, without the tracer's preamble; any
  other as `_data_error`."""
  message = str(error)
  if "Invalid value for argument" in message:
    message = message[message.index("Invalid value for argument"):]
    return ValueError(message.strip())
  return _data_error(model, data, error)


def _label_values(data):
  """The distinct labels of `(x, y)` arrays, for an error message."""
  if isinstance(data, tuple) and len(data) > 1 and hasattr(data[1],
                                                           "__array__"):
    values = np.unique(np.asarray(data[1]))
    shown = ", ".join(str(v) for v in values[:20])
    return f"[{shown}{', ...' if len(values) > 20 else ''}] with some "
  return ""


def _data_error(model, data, error):
  spec = getattr(data, "element_spec", None)
  shapes = (tf.nest.map_structure(lambda s: tuple(s.shape), spec)
            if spec is not None else tf.nest.map_structure(
                lambda t: tuple(getattr(t, "shape", ())), data))
  return ValueError(
      "Invalid value for argument `data`. Expected inputs that model "
      f"'{model.name}' accepts. Received: data of shape {shapes}. The model "
      f"raised: {error}")


def _accumulating(step, variables):
  """`totals + step(batch)` as one compiled call per batch.

  Traced for the dataset's element spec (batch axis unknown), so the short
  last batch does not cost a second trace; the sums stay on the device. Not
  a `for` over the dataset inside one `tf.function`: its loop body runs
  much slower than the same step called per batch (benchmarks/CHOICES.md).
  """
  totals_spec = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
  functions = {}

  def run(dataset):
    spec = dataset.element_spec
    key = repr(spec)
    if key not in functions:
      # No autograph: the steps hold no Python control flow on tensors
      # (nor may Keras 3 layers, whose `__call__` autograph never converts),
      # and converting the per-sample forms cost more than tracing them.
      # A partial, not a lambda: TensorFlow counts traces by code object and
      # would warn of "retracing" after five models' single traces each.
      functions[key] = tf.function(
          functools.partial(_add_step, step),
          input_signature=[totals_spec, spec], autograph=False)
    add = functions[key]
    totals = [tf.zeros(v.shape, tf.float32) for v in variables]
    count = 0
    for batch in dataset:
      size = int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
      # A trace (the first batch) learns the batch bound; the bound only
      # saves memory, so a later larger batch is still summed right.
      with per_sample_lib.largest_batch(size):
        totals = add(totals, batch)
      count += size
    return totals, count

  return run


def _add_step(step, totals, batch):
  return [t + s for t, s in zip(totals, step(batch))]


def _distributed_sums(model, key, step, variables, data, batch_size,
                      num_samples, labels, strategy):
  per_batch = _compiled(model, ("distributed",) + key,
                        lambda: _distributed(step, strategy))
  totals = [tf.zeros(v.shape, tf.float32) for v in variables]
  count = 0
  for batch in _data.input_batches(data, batch_size, num_samples, labels):
    sums = per_batch(_replica_shares(strategy, batch))
    totals = [t + s for t, s in zip(totals, sums)]
    count += int(tf.shape(tf.nest.flatten(batch[0])[0])[0])
  return totals, count


def _distributed(step, strategy):
  @tf.function(reduce_retracing=True, autograph=False)
  def per_batch(shares):
    sums = strategy.run(step, args=(shares,))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None)
            for s in sums]
  return per_batch


def _replica_shares(strategy, x):
  """Splits a global batch into contiguous per-replica shares.

  Every worker holds the whole batch and takes the shares of its own
  replicas, so that each sample is counted exactly once across the cluster.
  """
  size = int(tf.shape(tf.nest.flatten(x)[0])[0])
  replicas = strategy.num_replicas_in_sync
  bounds = [size * i // replicas for i in range(replicas + 1)]

  def share(context):
    i = context.replica_id_in_sync_group
    return tf.nest.map_structure(lambda t: t[bounds[i]:bounds[i + 1]], x)

  return strategy.experimental_distribute_values_from_function(share)


def _call_model(model, x):
  """The model's outputs, sequence positions marked as padding zeroed.

  A model that takes a `padding_mask` input (KerasHub's text models) and
  returns a sequence of that length (a causal LM's logits per token): the
  padding positions are not part of `F(x)`, so they add no gradient. The
  real tokens' logits are summed, not averaged: `‖F(x)‖²` is the squared
  norm of all that the model outputs for that text, and a mean would weigh
  a token of a short text more than one of a long text.
  """
  outputs = model(x, training=False)
  mask = x.get("padding_mask") if isinstance(x, dict) else None
  if (mask is not None and isinstance(outputs, tf.Tensor)
      and len(outputs.shape) == 3 and len(mask.shape) == 2):
    outputs = outputs * tf.cast(mask, outputs.dtype)[:, :, None]
  return outputs


# --------------------------------------------------------------------------
# Global MAS and Fisher.


def _output_norm(output_fn):
  """MAS's objective: `Σ_k ‖F(x_k)‖²`, labels unused."""

  def objective(outputs, y):
    del y
    if output_fn is not None:
      outputs = output_fn(outputs)
    return tf.reduce_sum(squared_output_norm(outputs))

  return objective


def _make_global_step(model, per_sample, objective, transform):
  """Per batch, `Σ_k transform(∂ objective_k / ∂θ)` for every variable.

  `objective(outputs, y)` must be a sum of per-sample terms; `transform` is
  `tf.abs` (MAS) or `tf.square` (Fisher), applied per sample, or to the
  batch's summed gradient when `per_sample` is False.
  """
  variables = list(model.trainable_variables)

  def split(batch):
    return batch[0], (batch[1] if len(batch) > 1 else None)

  if not per_sample:

    def step(batch):
      x, y = split(batch)
      with tf.GradientTape() as tape:
        loss = objective(_call_model(model, x), y)
      grads = tape.gradient(loss, variables,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return [transform(tf.cast(g, tf.float32)) for g in grads]

    return step

  units = per_sample_lib.plan(model, variables)
  layer_units = [u for u in units if u.layer is not None]
  model_units = [u for u in units if u.layer is None]

  def step(batch):
    x, y = split(batch)
    records = {}
    with per_sample_lib.recording(layer_units, records):
      with tf.GradientTape() as tape:
        loss = objective(_call_model(model, x), y)
    taps = [[r.taps for r in records[u]] for u in layer_units]
    deltas = tape.gradient(loss, taps,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)
    sums = {}
    for unit, unit_deltas in zip(layer_units, deltas):
      if records[unit]:  # Else not on the path from the inputs: Ω = 0.
        with _naming(unit):
          sums.update(unit.sums(records[unit], unit_deltas, transform))
    for unit in model_units:
      with _naming(unit):
        sums.update(unit.batch_sums(batch, objective, transform))
    return _in_order(sums, variables)

  return step


@contextlib.contextmanager
def _naming(unit):
  """Errors of a layer's per-sample form name the layer and its type."""
  try:
    yield
  except (ValueError, TypeError, NotImplementedError,
          tf.errors.OpError) as e:
    layer = unit.layer if unit.layer is not None else unit.model
    raise ValueError(
        "Invalid value for argument `model`. Expected layers whose own call "
        "can be re-run one sample at a time. Received: layer "
        f"'{layer.name}' of type {type(layer).__name__}, which failed with "
        f"{type(e).__name__}: {e}") from e


def _in_order(sums, variables):
  return [sums.get(id(v), tf.zeros(v.shape, tf.float32)) for v in variables]


# --------------------------------------------------------------------------
# Local MAS.


def _make_local_step(model, variables, output_fn):
  units = per_sample_lib.plan(model, variables)
  layer_units = [u for u in units if u.layer is not None]
  model_units = [u for u in units if u.layer is None]

  def norm(outputs):
    return tf.reduce_sum(squared_output_norm(outputs))

  def step(batch):
    records = {}
    with per_sample_lib.recording(layer_units, records):
      outputs = tf.nest.flatten(_call_model(model, batch[0]))
    found_output = False
    sums = {}
    for unit in layer_units:
      if not records[unit]:
        continue  # Not on the path from these inputs: importance stays 0.
      if isinstance(unit, per_sample_lib.Fallback):
        with _naming(unit):
          sums.update(unit.sums(records[unit], [None] * len(records[unit]),
                                tf.abs, objective=norm))
        continue
      again = []
      with tf.GradientTape() as tape:
        loss = 0.0
        for record in records[unit]:
          new = unit.recompute(record)
          output = new.output
          if output_fn is not None and any(
              record.output is o for o in outputs):
            output, found_output = output_fn(output), True
          loss += norm(output)
          again.append(new)
      deltas = tape.gradient(loss, [r.taps for r in again],
                             unconnected_gradients=(
                                 tf.UnconnectedGradients.ZERO))
      sums.update(unit.sums(again, deltas, tf.abs))
    if output_fn is not None and not found_output:
      raise ValueError(
          "Invalid value for argument `output_fn`. Expected a model whose "
          "output is produced by a layer with weights (e.g. a Dense head), "
          "so that the function can select part of that layer's output. "
          f"Received: output_fn={output_fn!r} for model '{model.name}'")
    for unit in model_units:
      with _naming(unit):
        sums.update(unit.batch_sums(batch, lambda out, y: norm(out), tf.abs))
    return _in_order(sums, variables)

  return step


# What `MASModel.consolidate(method=...)` accepts. Each takes
# `(model, data, num_samples=, batch_size=, **options)`.
ESTIMATORS = {
    "mas": mas,
    "local_mas": local_mas,
    "fisher": fisher,
    "uniform": uniform,
    "path_integral": path_integral,
}
