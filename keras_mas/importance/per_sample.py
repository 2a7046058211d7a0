"""Per-sample gradients of every layer's own variables, one layer at a time.

Exact MAS and Fisher importance need `Σ_k f(g_k)`, `g_k` the gradient of
sample `k` alone and `f` = |·| or (·)². One batched backward pass gives, for
every layer, its input `a` and the gradient `δ` at its output; from those
two, the per-sample gradient of the layer's *own* variables has a closed
form for the layers models are made of:

* Dense, EinsumDense (any equation, LoRA factors included): the einsum of
  `a` and `δ` with the batch axis kept; with one position per sample and no
  summed axis, `Σ_k f(a_k ⊗ δ_k) = f(A)ᵀ f(Δ)`, one matrix product.
* Conv1D/2D/3D (groups, `channels_first`, causal), DepthwiseConv1D/2D,
  SeparableConv1D/2D: per sample, the input ⊗ `δ` summed over positions.
  With many output positions, TensorFlow's own filter gradient computes
  all samples' at once, the batch folded into the channels (one group per
  sample); with one position, `f` factors as for Dense; with a few, or in
  3-D, from input patches.
* Embedding: `δ` scattered into the rows of the sample's token ids.
* BatchNormalization (inference), Layer-, Group- and RMSNormalization:
  γ gets `Σ_p δ·x̂`, β gets `Σ_p δ`, per sample.
* Keras's LSTM, GRU and SimpleRNN: the layer runs its recurrence with the
  input projection `x·W + b` taken out of the loop; the gradient there is
  `δ_t` at each step's pre-activations, and each step also returns the
  state it started from, so W gets `Σ_t x_tᵀ δ_t`, the recurrent kernel
  `Σ_t h_{t-1}ᵀ δ_t` (through the reset gate for GRU's candidate), the
  bias `Σ_t δ_t`, per sample.

A layer without a closed form (a custom layer with weights of its own, a
`keras.layers.RNN` of any cell) is a *fallback unit*: its variables alone
get exact per-sample gradients by re-running that layer's own call one
sample at a time inside a compiled `tf.while_loop`, with the recorded `δ`
as the output's cotangent. Memory stays at one copy of the layer's
variables whatever the batch. For local MAS, which measures each layer on
its own output, the recurrent layers above are re-run too, vectorized
(`tf.vectorized_map` over chunks of samples): for any other code the
vectorizer is not trusted, as it crashes the process on einsum gradients
(TF 2.21). The recurrent layers' closed forms keep the unit type
`Fallback`.

Layers are found by walking the model: a layer with a closed form is a unit;
a layer with weights of its own, or one that calls its sublayers inside a
loop (`keras.layers.RNN`, `TimeDistributed`), is a fallback unit as a whole;
any other layer (a nested model, `MultiHeadAttention`, a transformer block)
is looked through to its sublayers.
"""

import contextlib
import functools
import sys
import weakref

import keras
from keras import ops
from keras.src import backend as keras_backend
from keras.src.backend import AutocastScope
import numpy as np
import tensorflow as tf

__all__ = ["CLOSED_FORM_LAYERS", "Fallback", "ModelFallback", "Unit",
           "largest_batch", "plan", "recording"]

# At most this many float32 values of per-sample gradients (or convolution
# patches) exist at once: larger batches are processed in chunks.
_CHUNK_VALUES = 1 << 24

# Layers that call their sublayers inside a loop or `vectorized_map`: their
# sublayers cannot be recorded from outside, so they are fallback units.
_LOOPING_LAYERS = (keras.layers.RNN, keras.layers.TimeDistributed)


def _plain(layer, cls):
  """`layer` is a `cls` whose computation is `cls`'s own."""
  return isinstance(layer, cls) and type(layer).call is cls.call


# --------------------------------------------------------------------------
# Planning: which unit measures which variable.


def plan(model, variables):
  """Splits `variables` among units that measure them.

  Args:
    model: a built `keras.Model`.
    variables: the variables to measure (the model's trainable variables).

  Returns:
    A list of `Unit`s, each covering some of `variables`; together they
    cover every one exactly once.
  """
  wanted = {id(v): v for v in variables}
  units, covered, visited = [], set(), set()

  def take(layer_variables):
    own = [v for v in layer_variables
           if id(v) in wanted and id(v) not in covered]
    covered.update(id(v) for v in own)
    return own

  def visit(layer):
    if id(layer) in visited:
      return
    visited.add(id(layer))
    direct = [v for v in layer._trainable_variables if id(v) in wanted]
    unit_type = _closed_form(layer)
    if unit_type is not None and unit_type.covers(layer, direct):
      own = take(layer.trainable_variables)
      if own:
        units.append(unit_type(layer, own))
      return
    if direct or isinstance(layer, _LOOPING_LAYERS):
      own = take(layer.trainable_variables)
      if own:
        units.append(Fallback(layer, own))
      return
    for child in layer._flatten_layers(include_self=False, recursive=False):
      visit(child)

  visited.add(id(model))
  for child in model._flatten_layers(include_self=False, recursive=False):
    visit(child)
  rest = take(variables)
  if rest:  # The model's own weights, or variables no layer owns.
    units.append(ModelFallback(model, rest))
  return units


@contextlib.contextmanager
def recording(units, records):
  """Lets each unit's layer record its calls into `records[unit]`."""
  with contextlib.ExitStack() as stack:
    for unit in units:
      if unit.layer is not None:
        records[unit] = []
        stack.enter_context(_replaced_call(
            unit.layer, unit.recording_call(records[unit])))
    yield


def _replaced_call(layer, new_call):
  # Keras's `__call__` looks `call` up on the instance, so an instance
  # attribute intercepts it without touching the class or the layer's state.
  return _replaced_attribute(layer, "call", new_call)


@contextlib.contextmanager
def _replaced_attribute(layer, name, value):
  object.__setattr__(layer, name, value)
  try:
    yield
  finally:
    object.__delattr__(layer, name)


@contextlib.contextmanager
def _without_activation(layer):
  activation = layer.activation
  object.__setattr__(layer, "activation", None)
  try:
    yield activation
  finally:
    object.__setattr__(layer, "activation", activation)


@contextlib.contextmanager
def _as_called(layer):
  """The autocast scope Keras's `__call__` gives the layer's `call`, for
  re-running `call` directly (mixed precision reads variables as float16)."""
  if (layer is not None and layer.compute_dtype != layer.variable_dtype
      and keras.backend.is_float_dtype(layer.compute_dtype)):
    with AutocastScope(layer.compute_dtype):
      yield
  else:
    yield


def _closed_form(layer):
  for unit_type in _CLOSED_FORMS:
    if unit_type.handles(layer):
      return unit_type
  return None


# --------------------------------------------------------------------------
# Units.


class Unit:
  """Measures the per-sample gradients of some variables of one layer.

  A unit's `recording_call` replaces the layer's call during the batched
  pass, computing the same output and appending a record per call: the
  tensors the closed form needs (`saved`) and the tensors whose gradient it
  needs (`taps`). `sums` turns records and the gradients at their taps into
  `{id(variable): Σ_k f(g_k)}`.
  """

  def __init__(self, layer, variables):
    self.layer = layer
    self.variables = variables

  @classmethod
  def handles(cls, layer):  # pylint: disable=unused-argument
    return False

  @classmethod
  def covers(cls, layer, direct):
    """Whether the closed form accounts for every own variable."""
    known = {id(v) for v in cls.parameters(layer)}
    return all(id(v) in known for v in direct)

  @classmethod
  def parameters(cls, layer):
    raise NotImplementedError

  def recording_call(self, records):
    raise NotImplementedError

  def recompute(self, record):
    """The record again from its saved inputs, gradient stopped there."""
    raise NotImplementedError

  def sums(self, records, deltas, transform):
    raise NotImplementedError


class _Record:
  __slots__ = ("saved", "taps", "output", "steps")

  def __init__(self, saved, taps, output, steps=None):
    self.saved, self.taps, self.output = saved, taps, output
    # A recurrent layer's per-step tensors (`_recurrent_loop`), or None.
    self.steps = steps


class _Affine(Unit):
  """Layers computing `activation(linear(a; kernel) + bias)`."""

  def recording_call(self, records):
    layer = self.layer
    original = functools.partial(type(layer).call, layer)

    def call(inputs, *args, **kwargs):
      with _without_activation(layer) as activation:
        z = original(inputs, *args, **kwargs)
      output = activation(z) if activation is not None else z
      records.append(_Record(self._saved(inputs), [z], output))
      return output

    return call

  def recompute(self, record):
    layer = self.layer
    original = functools.partial(type(layer).call, layer)
    with _without_activation(layer) as activation, _as_called(layer):
      z = original(tf.stop_gradient(record.saved))
    output = activation(z) if activation is not None else z
    return _Record(record.saved, [z], output)

  def _saved(self, inputs):
    return inputs

  @classmethod
  def parameters(cls, layer):
    lora = ((layer.lora_kernel_a, layer.lora_kernel_b)
            if getattr(layer, "lora_enabled", False) else ())
    return [v for v in (_kernel(layer), layer.bias, *lora) if v is not None]

  def _bias_sums(self, deltas, transform, sums):
    bias = self.layer.bias
    if bias is not None and _measured(self, bias):
      per_sample = [_reduce_to(d, bias.shape) for d in deltas]
      sums[id(bias)] = tf.reduce_sum(transform(tf.add_n(per_sample)), axis=0)


class DenseUnit(_Affine):
  """`Dense`: `Σ_p a_p ⊗ δ_p`; LoRA factors through the same outer form."""

  @classmethod
  def handles(cls, layer):
    return (_plain(layer, keras.layers.Dense)
            and layer.quantization_mode is None)

  def sums(self, records, deltas, transform):
    layer = self.layer
    inputs = [r.saved for r in records]
    deltas = [d[0] for d in deltas]
    sums = {}
    if _measured(self, _kernel(layer)):
      sums[id(_kernel(layer))] = _outer_sums(inputs, deltas, transform)
    if layer.lora_enabled:
      scale = layer.lora_alpha / layer.lora_rank
      a, b = layer.lora_kernel_a, layer.lora_kernel_b
      if _measured(self, a):
        sums[id(a)] = _outer_sums(
            inputs, [ops.matmul(_f32(d), ops.transpose(b)) * scale
                     for d in deltas], transform)
      if _measured(self, b):
        sums[id(b)] = _outer_sums(
            [ops.matmul(_f32(x), a) * scale for x in inputs], deltas,
            transform)
    self._bias_sums(deltas, transform, sums)
    return sums


class EinsumDenseUnit(_Affine):
  """`EinsumDense`: `einsum(a, δ)` keeping the batch axis."""

  @classmethod
  def handles(cls, layer):
    if not (_plain(layer, keras.layers.EinsumDense)
            and layer.quantization_mode is None):
      return False
    try:
      _einsum_kernel_spec(layer.equation)
    except _NoClosedForm:
      return False
    return True

  def sums(self, records, deltas, transform):
    layer = self.layer
    deltas = [d[0] for d in deltas]
    kernel_shape = tuple(_kernel(layer).shape)
    sums = {}
    grads = [_einsum_kernel_spec(layer.equation, len(r.saved.shape),
                                 len(d.shape))
             for r, d in zip(records, deltas)]
    lora = layer.lora_enabled
    if not lora and all(outer for _, outer in grads):
      # Each kernel entry meets one input and one output entry per sample:
      # Σ_k f(a_k ⊗ δ_k) = einsum(f(A), f(Δ)), the batch summed inside.
      if _measured(self, _kernel(layer)):
        sums[id(_kernel(layer))] = tf.add_n([
            tf.einsum(spec.replace("->" + spec.split(",")[0][0], "->"),
                      transform(_f32(r.saved)), transform(_f32(d)))
            for (spec, _), r, d in zip(grads, records, deltas)])
    else:
      scale = layer.lora_alpha / layer.lora_rank if lora else 1.0
      measured = [v for v in ((layer.lora_kernel_a, layer.lora_kernel_b)
                              if lora else (_kernel(layer),))
                  if _measured(self, v)]

      def per_chunk(*tensors):
        n = len(records)
        g = tf.add_n([tf.einsum(spec, x, d) for (spec, _), x, d in zip(
            grads, tensors[:n], tensors[n:])])
        if not lora:
          return [tf.reduce_sum(transform(g), axis=0)]
        a, b = _f32(layer.lora_kernel_a), _f32(layer.lora_kernel_b)
        flat = tf.reshape(g, [tf.shape(g)[0], -1, kernel_shape[-1]])
        grad_a = tf.reshape(tf.einsum("bmo,ro->bmr", flat, b) * scale,
                            [-1] + list(a.shape))
        grad_b = tf.einsum("mr,bmo->bro", tf.reshape(a, [-1, a.shape[-1]]),
                           flat) * scale
        return [tf.reduce_sum(transform(x), axis=0)
                for v, x in ((layer.lora_kernel_a, grad_a),
                             (layer.lora_kernel_b, grad_b))
                if _measured(self, v)]

      size = _size(kernel_shape)
      values = _chunked_sum(per_chunk, [_f32(r.saved) for r in records]
                            + [_f32(d) for d in deltas], size)
      sums.update({id(v): s for v, s in zip(measured, values)})
    self._bias_sums(deltas, transform, sums)
    return sums


def _einsum_kernel_spec(equation, input_rank=None, output_rank=None):
  """The einsum giving per-sample kernel gradients, and whether it is outer.

  Returns `(spec, outer)`: `spec` maps (input, output gradient) to
  `(batch, *kernel)`; `outer` says each kernel entry pairs one input entry
  with one output entry per sample (no axis summed, none shared).
  """
  inputs, rest = equation.split(",")
  kernel, output = rest.split("->")
  if "..." in inputs or "..." in output:
    used = set(equation)
    free = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in used]
    # Without ranks (a structural check), "..." stands for one axis.
    count_in = 1 if input_rank is None else input_rank - (len(inputs) - 3)
    count_out = 1 if output_rank is None else output_rank - (len(output) - 3)
    inputs = inputs.replace("...", "".join(free[:count_in]))
    output = output.replace("...", "".join(free[:count_out]))
  batch = inputs[0]
  if output[0] != batch or batch in kernel or any(
      c not in inputs + output for c in kernel):
    raise _NoClosedForm(equation)
  positions = set(inputs + output) - set(kernel) - {batch}
  shared = set(inputs) & set(output) & set(kernel)
  outer = not positions and not shared
  return f"{inputs},{output}->{batch}{kernel}", outer


class _NoClosedForm(Exception):
  pass


class ConvUnit(_Affine):
  """Convolutions: patches ⊗ `δ`, summed over positions per sample."""

  _TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

  @classmethod
  def handles(cls, layer):
    if not any(_plain(layer, t) for t in cls._TYPES) or getattr(
        layer, "lora_enabled", False):
      return False
    return _patches_supported(layer)

  def _saved(self, inputs):
    # Conv1D's causal padding happens inside its call: pad the same way.
    layer = self.layer
    if layer.padding == "causal":
      inputs = ops.pad(inputs, layer._compute_causal_padding())
    return inputs

  def recompute(self, record):
    layer = self.layer
    with _without_activation(layer) as activation, _as_called(layer):
      z = ops.conv(tf.stop_gradient(record.saved), layer.kernel,
                   strides=list(layer.strides),
                   padding="valid" if layer.padding == "causal" else (
                       layer.padding),
                   dilation_rate=layer.dilation_rate,
                   data_format=layer.data_format)
      if layer.use_bias:
        z = z + ops.reshape(layer.bias, _bias_shape(layer, layer.filters))
    output = activation(z) if activation is not None else z
    return _Record(record.saved, [z], output)

  def sums(self, records, deltas, transform):
    layer = self.layer
    deltas = [_f32(_channels_last(layer, d[0])) for d in deltas]
    sums = {}
    kernel = _kernel(layer)
    if _measured(self, kernel):
      sums[id(kernel)] = self._kernel_sums(
          kernel, [_f32(_channels_last(layer, r.saved)) for r in records],
          deltas, transform)
    self._bias_sums(deltas, transform, sums)
    return sums

  def _kernel_sums(self, kernel, inputs, deltas, transform):
    layer = self.layer
    if all(k == 1 for k in layer.kernel_size) and layer.groups == 1:
      # A pointwise kernel is a Dense layer over the (strided) positions.
      return tf.reshape(_outer_sums([_strided(layer, x) for x in inputs],
                                    deltas, transform), kernel.shape)
    return _conv_kernel_sums(layer, kernel, inputs, deltas, transform,
                             depthwise=False)


class DepthwiseConvUnit(ConvUnit):
  """Depthwise convolutions: per channel, patches ⊗ `δ`."""

  _TYPES = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

  recompute = _Affine.recompute

  def _kernel_sums(self, kernel, inputs, deltas, transform):
    return _depthwise_sums(self.layer, kernel, inputs, deltas, transform)


def _depthwise_sums(layer, kernel, inputs, deltas, transform):
  return _conv_kernel_sums(layer, kernel, inputs, deltas, transform,
                           depthwise=True)


def _conv_kernel_sums(layer, kernel, inputs, deltas, transform, depthwise):
  """`Σ_k f(g_k)` of a convolution's kernel, by the cheapest exact form.

  Per call: one position per sample factors `f` (`f(patch)ᵀ f(δ)`); many
  positions go through TensorFlow's own filter gradient with the batch
  folded into the channels (`_folded_filter_gradients`); a few positions,
  or shapes that gradient does not take, through input patches.
  """
  kernel_shape = tuple(kernel.shape)
  forms = [_conv_form(layer, d, depthwise) for d in deltas]
  if forms == ["single"]:
    return _single_position_sums(layer, kernel_shape, inputs[0], deltas[0],
                                 transform, depthwise)

  def per_chunk(*tensors):
    n = len(inputs)
    grads = [_folded_filter_gradients(layer, kernel_shape, x, d, depthwise)
             if form == "folded" else (
                 _patch_gradients(layer, kernel_shape, x, d, depthwise), 0)
             for form, x, d in zip(forms, tensors[:n], tensors[n:])]
    if len(grads) == 1:
      # Summed where TensorFlow left the batch axis: no transpose.
      g, axis = grads[0]
      return [tf.reduce_sum(transform(g), axis=axis)]
    total = tf.add_n([_batch_first(g, axis) for g, axis in grads])
    return [tf.reduce_sum(transform(total), axis=0)]

  taps = _size(kernel_shape[:-2])
  per_sample = max(_size(kernel_shape), max(
      _size(x.shape[1:]) * taps for x in inputs))
  return _chunked_sum(per_chunk, list(inputs) + list(deltas), per_sample)[0]


def _batch_first(g, axis):
  if axis == 0:
    return g
  rank = len(g.shape)
  return tf.transpose(g, [axis] + [i for i in range(rank) if i != axis])


# Below this many output positions a sample, TensorFlow's grouped filter
# gradients lose to patches, by up to 40× for depthwise kernels on 2×2
# inputs of many channels (CPU, benchmarks/PER_SAMPLE.md).
_FOLDED_MIN_POSITIONS = 16


def _conv_form(layer, delta, depthwise):
  """"single" (one output position a sample), "folded" or "patches"."""
  positions = delta.shape[1:-1]
  if not positions.is_fully_defined():
    return "patches"
  count = _size(positions)
  if count == 1:
    return "single"
  if count < _FOLDED_MIN_POSITIONS or layer.rank == 3:
    return "patches"  # No grouped 3-D filter gradient in TensorFlow.
  if depthwise and (any(r != 1 for r in layer.dilation_rate) or len(
      set(_pair(layer.strides))) > 1):
    # TensorFlow's depthwise filter gradient gives wrong values for
    # dilated kernels on CPU and takes equal strides only.
    return "patches"
  return "folded"


def _single_position_sums(layer, kernel_shape, x, delta, transform,
                          depthwise):
  """One output position a sample: each gradient entry is one product of a
  patch entry and a `δ` entry, so `f` factors and the batch sums inside."""
  taps, cin, last = (_size(kernel_shape[:-2]), kernel_shape[-2],
                     kernel_shape[-1])
  groups = 1 if depthwise else layer.groups
  a = transform(tf.reshape(_f32(_patches(layer, x)), [-1, taps, groups, cin]))
  d = transform(tf.reshape(_f32(delta), [-1, groups, last // groups]))
  if depthwise:  # groups is 1; δ's channels are (cin, multiplier).
    total = tf.einsum("bkc,bcm->kcm", a[:, :, 0],
                      tf.reshape(d, [-1, cin, last]))
  else:
    total = tf.einsum("bkgi,bgf->kigf", a, d)
  return tf.reshape(total, kernel_shape)


def _patch_gradients(layer, kernel_shape, x, d, depthwise):
  """Per-sample kernel gradients `(batch, *kernel_shape)` from patches."""
  taps, cin, last = (_size(kernel_shape[:-2]), kernel_shape[-2],
                     kernel_shape[-1])
  p, d = _f32(_patches(layer, x)), _f32(d)  # p: (b, P, taps·channels)
  if depthwise:
    p = tf.reshape(p, [tf.shape(p)[0], -1, taps, cin])
    d = tf.reshape(d, [tf.shape(d)[0], -1, cin, last])
    g = tf.einsum("bpkc,bpcm->bkcm", p, d)
  else:
    groups = layer.groups
    p = tf.reshape(p, [tf.shape(p)[0], -1, taps, groups, cin])
    d = tf.reshape(d, [tf.shape(d)[0], -1, groups, last // groups])
    g = tf.einsum("bpkgi,bpgf->bkigf", p, d)
  return tf.reshape(g, [-1, *kernel_shape])


def _folded_filter_gradients(layer, kernel_shape, x, d, depthwise):
  """Per-sample kernel gradients, all in one call of TensorFlow's filter
  gradient: the batch folded into the channels, each sample a group of its
  own, so a sample's inputs meet only its own `δ`.

  Returns:
    `(g, axis)`: the gradients, with the batch at `axis` of `g` and the
    kernel's axes in order around it.
  """
  x, d = _f32(x), _f32(d)
  if layer.rank == 1:  # As a 2-D convolution of height 1.
    x, d = x[:, None], d[:, None]
  count = tf.shape(x)[0]

  def folded(t):  # (b, h, w, c) -> (1, h, w, b·c)
    t = tf.transpose(t, [1, 2, 0, 3])
    return tf.reshape(t, [1, t.shape[0], t.shape[1], -1])

  options = dict(strides=[1, *_pair(layer.strides), 1],
                 dilations=[1, *_pair(layer.dilation_rate), 1],
                 padding="SAME" if layer.padding == "same" else "VALID")
  spatial = _pair(kernel_shape[:-2])
  cin, last = kernel_shape[-2], kernel_shape[-1]
  if depthwise:
    g = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
        input=folded(x), filter_sizes=tf.stack([*spatial, count * cin, last]),
        out_backprop=folded(d), **options)
    shape = [*kernel_shape[:-2], -1, cin, last]
  else:
    g = tf.raw_ops.Conv2DBackpropFilter(
        input=folded(x), filter_sizes=tf.stack([*spatial, cin, count * last]),
        out_backprop=folded(d), **options)
    shape = [*kernel_shape[:-2], cin, -1, last]
  return tf.reshape(g, shape), len(shape) - (3 if depthwise else 2)


def _pair(values):
  """Spatial sizes as 2-D (a 1-D convolution has height 1)."""
  values = list(values)
  return [1] + values if len(values) == 1 else values


class SeparableConvUnit(ConvUnit):
  """Separable convolutions: a depthwise then a pointwise closed form."""

  _TYPES = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)

  @classmethod
  def parameters(cls, layer):
    return [v for v in (layer.depthwise_kernel, layer.pointwise_kernel,
                        layer.bias) if v is not None]

  def _forward(self, inputs):
    layer = self.layer
    h = ops.depthwise_conv(inputs, layer.depthwise_kernel,
                           strides=layer.strides, padding=layer.padding,
                           dilation_rate=layer.dilation_rate,
                           data_format=layer.data_format)
    z = ops.conv(h, layer.pointwise_kernel, strides=1, padding="valid",
                 data_format=layer.data_format)
    if layer.use_bias:
      z = z + ops.reshape(layer.bias, _bias_shape(layer, layer.filters))
    output = layer.activation(z) if layer.activation is not None else z
    return h, z, output

  def recording_call(self, records):
    def call(inputs, *args, **kwargs):
      del args, kwargs
      h, z, output = self._forward(inputs)
      records.append(_Record(inputs, [h, z], output))
      return output
    return call

  def recompute(self, record):
    with _as_called(self.layer):
      h, z, output = self._forward(tf.stop_gradient(record.saved))
    return _Record(record.saved, [h, z], output)

  def sums(self, records, deltas, transform):
    layer = self.layer
    sums = {}
    inner = [_channels_last(layer, d[0]) for d in deltas]
    outer = [_channels_last(layer, d[1]) for d in deltas]
    if _measured(self, layer.depthwise_kernel):
      sums[id(layer.depthwise_kernel)] = _depthwise_sums(
          layer, layer.depthwise_kernel,
          [_f32(_channels_last(layer, r.saved)) for r in records], inner,
          transform)
    if _measured(self, layer.pointwise_kernel):
      kernel = layer.pointwise_kernel
      hidden = [_channels_last(layer, r.taps[0]) for r in records]
      sums[id(kernel)] = tf.reshape(
          _outer_sums(hidden, outer, transform), kernel.shape)
    self._bias_sums(outer, transform, sums)
    return sums


class EmbeddingUnit(Unit):
  """`Embedding`: per sample, `δ` summed into the rows of its token ids."""

  @classmethod
  def handles(cls, layer):
    return (_plain(layer, keras.layers.Embedding)
            and not layer.lora_enabled and layer.quantization_mode is None)

  @classmethod
  def parameters(cls, layer):
    return [layer._embeddings]

  def recording_call(self, records):
    original = functools.partial(type(self.layer).call, self.layer)

    def call(inputs, *args, **kwargs):
      output = original(inputs, *args, **kwargs)
      records.append(_Record(inputs, [output], output))
      return output

    return call

  def recompute(self, record):
    with _as_called(self.layer):
      output = type(self.layer).call(self.layer, record.saved)
    return _Record(record.saved, [output], output)

  def sums(self, records, deltas, transform):
    table = self.layer._embeddings
    return {id(table): _row_sums([r.saved for r in records],
                                 [d[0] for d in deltas], table.shape,
                                 transform)}


def _row_sums(ids, deltas, shape, transform):
  """`Σ_k f(g_k)` for a table whose rows a sample looks up: `g_k` holds, in
  each row, the sum of `δ` over the sample's positions that read it.

  Args:
    ids: the row indices of each call, `(batch, ...)`.
    deltas: the gradients at each call's looked-up rows, `(batch, ..., width)`.
    shape: the table's `(rows, width)`.
    transform: `f`.
  """
  rows, width = shape
  ids = tf.concat([tf.reshape(tf.cast(i, tf.int64), [tf.shape(i)[0], -1])
                   for i in ids], axis=1)
  grads = tf.concat([tf.reshape(_f32(d), [tf.shape(d)[0], -1, width])
                     for d in deltas], axis=1)
  sample = tf.broadcast_to(
      tf.range(tf.shape(ids, out_type=tf.int64)[0])[:, None],
      tf.shape(ids, out_type=tf.int64))
  keys, slot = tf.unique(tf.reshape(sample * rows + ids, [-1]))
  per_sample_rows = tf.math.unsorted_segment_sum(
      tf.reshape(grads, [-1, width]), slot, tf.shape(keys)[0])
  return tf.math.unsorted_segment_sum(transform(per_sample_rows), keys % rows,
                                      rows)


def _keras_hub_layer(name):
  """KerasHub's layer class `name` if KerasHub is in use, else None (a model
  with KerasHub layers has imported it; nothing here imports it)."""
  keras_hub = sys.modules.get("keras_hub")
  return getattr(getattr(keras_hub, "layers", None), name, None)


class ReversibleEmbeddingUnit(Unit):
  """`ReversibleEmbedding`, a language model's token table, called forward
  (rows of the sample's ids, as `Embedding`) and in reverse (the logits
  `h·Eᵀ`, or `h·R` with an untied output table): with tied tables, each
  sample's gradient adds both before `f` is taken."""

  @classmethod
  def handles(cls, layer):
    return (_plain(layer, keras.layers.ReversibleEmbedding)
            and not layer.lora_enabled and layer.quantization_mode is None)

  @classmethod
  def parameters(cls, layer):
    return [layer._embeddings] + (
        [] if layer.tie_weights else [layer.reverse_embeddings])

  def _reverse(self, hidden):
    """The logits before and after the soft cap, as the layer computes them."""
    layer = self.layer
    kernel = (ops.transpose(layer._embeddings) if layer.tie_weights
              else layer.reverse_embeddings)
    if layer.reverse_dtype is not None:
      hidden = ops.cast(hidden, layer.reverse_dtype)
      kernel = ops.cast(kernel, layer.reverse_dtype)
    z = ops.matmul(hidden, kernel)
    cap = layer.logit_soft_cap
    return z, (z if cap is None else ops.tanh(z / cap) * cap)

  def recording_call(self, records):
    original = functools.partial(type(self.layer).call, self.layer)

    def call(inputs, reverse=False):
      if not reverse:
        output = original(inputs)
        records.append(_Record(("ids", inputs), [output], output))
        return output
      z, output = self._reverse(inputs)
      records.append(_Record(("hidden", inputs), [z], output))
      return output

    return call

  def recompute(self, record):
    kind, saved = record.saved
    with _as_called(self.layer):
      if kind == "ids":
        output = type(self.layer).call(self.layer, saved)
        return _Record(record.saved, [output], output)
      z, output = self._reverse(tf.stop_gradient(saved))
    return _Record(record.saved, [z], output)

  def sums(self, records, deltas, transform):
    layer = self.layer
    table = layer._embeddings
    calls = {"ids": ([], []), "hidden": ([], [])}
    for r, d in zip(records, deltas):
      calls[r.saved[0]][0].append(r.saved[1])
      calls[r.saved[0]][1].append(d[0])
    (ids, row_deltas), (hidden, logit_deltas) = calls["ids"], calls["hidden"]
    sums = {}
    if not layer.tie_weights:
      reverse = layer.reverse_embeddings
      if hidden and _measured(self, reverse):
        sums[id(reverse)] = _outer_sums(hidden, logit_deltas, transform)
      if ids and _measured(self, table):
        sums[id(table)] = _row_sums(ids, row_deltas, table.shape, transform)
      return sums
    if not _measured(self, table):
      return sums
    if not hidden:
      sums[id(table)] = _row_sums(ids, row_deltas, table.shape, transform)
      return sums
    rows, width = table.shape

    def positions(tensors, last):
      return tf.concat([tf.reshape(_f32(t), [tf.shape(t)[0], -1, last])
                        for t in tensors], axis=1)

    tensors = [positions(hidden, width), positions(logit_deltas, rows)]
    if ids:
      tensors += [tf.concat([tf.reshape(tf.cast(i, tf.int64),
                                        [tf.shape(i)[0], -1]) for i in ids],
                            axis=1), positions(row_deltas, width)]

    def per_chunk(h, dz, *looked_up):
      g = tf.einsum("bpv,bpd->bvd", dz, h)  # ∂(h·Eᵀ)/∂E, per sample.
      if looked_up:
        i, r = looked_up
        sample = tf.broadcast_to(
            tf.range(tf.shape(i, out_type=tf.int64)[0])[:, None],
            tf.shape(i, out_type=tf.int64))
        g = tf.tensor_scatter_nd_add(
            g, tf.reshape(tf.stack([sample, i], axis=-1), [-1, 2]),
            tf.reshape(r, [-1, width]))
      return [tf.reduce_sum(transform(g), axis=0)]

    sums[id(table)] = _chunked_sum(per_chunk, tensors, rows * width)[0]
    return sums


class PositionEmbeddingUnit(Unit):
  """KerasHub's learned `PositionEmbedding`: per sample, `δ` at each
  position added to that position's row."""

  @classmethod
  def handles(cls, layer):
    kind = _keras_hub_layer("PositionEmbedding")
    return kind is not None and _plain(layer, kind)

  @classmethod
  def parameters(cls, layer):
    return [layer.position_embeddings]

  def _rows(self, inputs, start_index, positions):
    shape = tf.shape(inputs)
    if positions is None:
      rows = tf.range(shape[-2], dtype=tf.int64)[None] + tf.cast(
          start_index, tf.int64)
    else:
      rows = tf.cast(positions, tf.int64)
      if len(rows.shape) == 1:
        rows = rows[None]
    return tf.broadcast_to(rows, shape[:-1])

  def recording_call(self, records):
    original = functools.partial(type(self.layer).call, self.layer)

    def call(inputs, start_index=0, positions=None):
      output = original(inputs, start_index=start_index, positions=positions)
      records.append(_Record(self._rows(inputs, start_index, positions),
                             [output], output))
      return output

    return call

  def recompute(self, record):
    output = tf.gather(tf.cast(self.layer.position_embeddings,
                               self.layer.compute_dtype), record.saved)
    return _Record(record.saved, [output], output)

  def sums(self, records, deltas, transform):
    table = self.layer.position_embeddings
    return {id(table): _row_sums([r.saved for r in records],
                                 [d[0] for d in deltas], table.shape,
                                 transform)}


class RMSScaleUnit(Unit):
  """A custom RMS normalization, `x̂·(c + γ)` with `x̂ = x/√(mean(x²)+ε)` on
  the last axis and `c` 0 or 1 (KerasHub's Llama, Gemma, Mistral, Qwen
  norms and any such layer of the user's): `γ` gets `Σ_p δ·x̂`, per sample.

  Recognised by trying, not by name: the layer's only weight is a vector
  `γ`, it has an `epsilon`, and at two random `γ` its output is `x̂·(c + γ)`.
  """

  @classmethod
  def handles(cls, layer):
    return _rms_offset(layer) is not None

  @classmethod
  def parameters(cls, layer):
    return list(layer._trainable_variables)

  def _normalized(self, inputs):
    x = tf.cast(inputs, tf.float32)
    square = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
    return x * tf.math.rsqrt(square + self.layer.epsilon)

  def _scaled(self, normalized):
    offset = _rms_offset(self.layer)
    scale = tf.cast(self.layer._trainable_variables[0], tf.float32)
    return normalized * (offset + scale)

  def recording_call(self, records):
    original = functools.partial(type(self.layer).call, self.layer)

    def call(inputs, *args, **kwargs):
      output = original(inputs, *args, **kwargs)
      records.append(_Record(self._normalized(inputs), [output], output))
      return output

    return call

  def recompute(self, record):
    z = self._scaled(tf.stop_gradient(record.saved))
    return _Record(record.saved, [z], z)

  def sums(self, records, deltas, transform):
    scale = self.layer._trainable_variables[0]
    per_sample = []
    for r, d in zip(records, deltas):
      g = _f32(d[0]) * r.saved
      per_sample.append(tf.reduce_sum(g, axis=list(range(1, len(g.shape) - 1))))
    return {id(scale): tf.reduce_sum(transform(tf.add_n(per_sample)), axis=0)}


# Per layer, whether and how it is an RMS norm (None: it is not).
_RMS_OFFSETS = weakref.WeakKeyDictionary()


def _rms_offset(layer):
  """`c` where `layer` computes `x̂·(c + γ)` (see `RMSScaleUnit`), else None.

  Tried once per layer, eagerly, on random inputs with two random `γ` put in
  place of the weight's value (`keras.StatelessScope`): a layer whose output
  is not exactly that keeps the per-sample loop.
  """
  if layer in _RMS_OFFSETS:
    return _RMS_OFFSETS[layer]
  offset = None
  own = list(layer._trainable_variables)
  epsilon = getattr(layer, "epsilon", None)
  if (len(own) == 1 and len(own[0].shape) == 1 and not layer.weights[1:]
      and isinstance(epsilon, (int, float))
      and not isinstance(layer, (keras.layers.LayerNormalization,
                                 keras.layers.BatchNormalization,
                                 keras.layers.GroupNormalization))):
    offset = _probe_rms_offset(layer, own[0], float(epsilon))
  _RMS_OFFSETS[layer] = offset
  return offset


def _probe_rms_offset(layer, scale, epsilon):
  rng = np.random.default_rng(0)
  width = scale.shape[0]
  x = rng.normal(size=(2, 3, width)).astype("float32") * 3
  normalized = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon)
  half = keras.backend.standardize_dtype(layer.compute_dtype) != "float32"
  rtol = 1e-2 if half else 1e-5
  trials = [rng.normal(size=(width,)).astype("float32") for _ in range(2)]
  with tf.init_scope():
    for offset in (0.0, 1.0):
      for gamma in trials:
        try:
          with keras.StatelessScope(state_mapping=[
              (scale, ops.cast(gamma, scale.dtype))]), _as_called(layer):
            output = type(layer).call(layer, ops.cast(x, layer.compute_dtype))
          output = np.asarray(ops.convert_to_numpy(ops.cast(output,
                                                            "float32")))
        except Exception:  # pylint: disable=broad-except
          return None  # Not callable on a plain tensor: the loop measures it.
        expected = normalized * (offset + gamma)
        if output.shape != expected.shape or not np.allclose(
            output, expected, rtol=rtol,
            atol=rtol * float(np.max(np.abs(expected)))):
          break
      else:
        return offset
  return None


class NormalizationUnit(Unit):
  """Batch (inference), layer and group normalization: γ and β of `x̂`."""

  @classmethod
  def handles(cls, layer):
    if _plain(layer, keras.layers.BatchNormalization):
      return not getattr(layer, "renorm", False)
    return (_plain(layer, keras.layers.LayerNormalization)
            or _plain(layer, keras.layers.GroupNormalization)
            or _plain(layer, keras.layers.RMSNormalization))

  @classmethod
  def parameters(cls, layer):
    return [v for v in _scale_and_offset(layer) if v is not None]

  def _axes(self, rank):
    axis = self.layer.axis
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % rank for a in axes)

  def _normalized(self, inputs):
    layer = self.layer
    x = tf.cast(inputs, tf.float32)
    if isinstance(layer, keras.layers.BatchNormalization):
      return ops.batch_normalization(
          x, ops.cast(layer.moving_mean, "float32"),
          ops.cast(layer.moving_variance, "float32"), axis=layer.axis,
          epsilon=layer.epsilon)
    if isinstance(layer, keras.layers.RMSNormalization):
      axes = self._axes(len(x.shape))
      square = tf.reduce_mean(tf.square(x), axis=axes, keepdims=True)
      return x * tf.math.rsqrt(square + layer.epsilon)
    if isinstance(layer, keras.layers.LayerNormalization):
      axes = self._axes(len(x.shape))
      if layer.rms_scaling:
        variance = tf.math.reduce_variance(x, axis=axes, keepdims=True)
        return x * tf.math.rsqrt(variance + layer.epsilon)
      mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
      return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
    grouped = layer._reshape_into_groups(x)
    reduction = list(range(1, len(grouped.shape)))
    reduction.pop(-2 if layer.axis == -1 else layer.axis - 1)
    mean, variance = tf.nn.moments(grouped, axes=reduction, keepdims=True)
    normalized = (grouped - mean) * tf.math.rsqrt(variance + layer.epsilon)
    return tf.reshape(normalized, tf.shape(x))

  def _affine(self, normalized):
    layer = self.layer
    shape = [1] * len(normalized.shape)
    for a in self._axes(len(normalized.shape)):
      shape[a] = normalized.shape[a]
    scale, offset = _scale_and_offset(layer)
    z = normalized
    if scale is not None:
      z = z * tf.reshape(tf.cast(scale, tf.float32), shape)
    if offset is not None:
      z = z + tf.reshape(tf.cast(offset, tf.float32), shape)
    return z

  def recording_call(self, records):
    def call(inputs, *args, **kwargs):
      del args, kwargs  # training=False, mask: no effect in inference.
      normalized = self._normalized(inputs)
      z = self._affine(normalized)
      records.append(_Record(normalized, [z], z))
      return tf.cast(z, self.layer.compute_dtype)
    return call

  def recompute(self, record):
    z = self._affine(tf.stop_gradient(record.saved))
    return _Record(record.saved, [z], z)

  def sums(self, records, deltas, transform):
    layer = self.layer
    sums = {}
    for v, weigh in zip(_scale_and_offset(layer), (True, False)):
      if v is None or not _measured(self, v):
        continue
      per_sample = []
      for r, d in zip(records, deltas):
        d = _f32(d[0])
        g = d * r.saved if weigh else d
        rank = len(g.shape)
        keep = self._axes(rank)
        other = [a for a in range(1, rank) if a not in keep]
        per_sample.append(tf.reduce_sum(g, axis=other) if other else g)
      sums[id(v)] = tf.reduce_sum(
          transform(tf.reshape(tf.add_n(per_sample), [-1, *v.shape])), axis=0)
    return sums


def _scale_and_offset(layer):
  """γ and β of a normalization layer (either may be None)."""
  if isinstance(layer, keras.layers.RMSNormalization):
    return layer.scale, None
  return layer.gamma, layer.beta


class Fallback(Unit):
  """Any other layer: its own call re-run one sample at a time.

  Keras's LSTM, GRU and SimpleRNN are measured in closed form instead
  (`_recurrent_loop`), except for local MAS, which re-runs them.
  """

  def recording_call(self, records):
    if type(self.layer) in _RECURRENT:
      return _recurrent_recording_call(self.layer, records)
    original = functools.partial(type(self.layer).call, self.layer)

    def call(*args, **kwargs):
      output = original(*args, **kwargs)
      records.append(_Record((args, kwargs), tf.nest.flatten(output), output))
      return output

    return call

  def _call(self, saved):
    args, kwargs = saved
    with _as_called(self.layer):
      return type(self.layer).call(self.layer, *args, **kwargs)

  def sums(self, records, deltas, transform, objective=None):
    """Per-sample gradients of `Σ <output, δ>` (or of `objective(output)`)."""
    stepped = [r.steps is not None for r in records]
    if objective is None and all(stepped):
      return _recurrent_sums(self, records, deltas, transform)
    if objective is None and any(stepped):
      raise ValueError(
          "Invalid value for argument `model`. Expected recurrent layers "
          "called without dropout in training mode. Received: layer "
          f"'{self.layer.name}' called both ways")
    inputs = [(r.saved, d) for r, d in zip(records, deltas)]

    def loss(sample):
      total = 0.0
      for saved, delta in sample:
        output = self._call(saved)
        if objective is not None:
          total += objective(output)
        else:
          total += tf.add_n([
              tf.reduce_sum(_f32(o) * tf.stop_gradient(_f32(g)))
              for o, g in zip(tf.nest.flatten(output), delta)])
      return total

    sums = (_vectorized_sums if type(self.layer) in _VECTORIZABLE
            else _per_example_sums)
    values = sums(loss, inputs, self.variables, transform)
    return {id(v): s for v, s in zip(self.variables, values)}


class ModelFallback(Fallback):
  """Variables of the model itself: the whole model, one sample at a time."""

  def __init__(self, model, variables):
    super().__init__(None, variables)
    self.model = model

  def batch_sums(self, batch, objective, transform):
    """`Σ_k f(∂ objective(model(x_k), y_k) / ∂θ)` over `batch = (x[, y])`."""
    def loss(sample):
      x, y = sample[0], (sample[1] if len(sample) > 1 else None)
      return objective(self.model(x, training=False), y)

    values = _per_example_sums(loss, tuple(batch), self.variables, transform)
    return {id(v): s for v, s in zip(self.variables, values)}


_CLOSED_FORMS = (DenseUnit, EinsumDenseUnit, ConvUnit, DepthwiseConvUnit,
                 SeparableConvUnit, EmbeddingUnit, ReversibleEmbeddingUnit,
                 PositionEmbeddingUnit, NormalizationUnit, RMSScaleUnit)

CLOSED_FORM_LAYERS = (
    "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D",
    "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Embedding",
    "ReversibleEmbedding", "PositionEmbedding (KerasHub)",
    "BatchNormalization", "LayerNormalization", "GroupNormalization",
    "RMSNormalization", "RMS norms x̂·(c + γ) (KerasHub's, found by trying)",
    "LSTM", "GRU", "SimpleRNN (global MAS and Fisher; local MAS re-runs "
    "them per sample)")


# --------------------------------------------------------------------------
# Shared pieces.


def _kernel(layer):
  """The kernel variable (Dense's `kernel` is a property adding LoRA)."""
  kernel = getattr(layer, "_kernel", None)
  return kernel if kernel is not None else layer.kernel


def _measured(unit, variable):
  return any(v is variable for v in unit.variables)


def _f32(t):
  return tf.cast(t, tf.float32)


def _size(shape):
  size = 1
  for s in shape:
    size *= int(s)
  return size


def _outer_sums(inputs, deltas, transform):
  """`Σ_k f(Σ_p a_kp ⊗ δ_kp)` over a layer's calls (last axes contracted).

  `p` runs over every position at which sample `k` met the layer: extra
  input axes (a Dense layer on sequences, convolution positions) and
  repeated calls (a shared layer). With one position per sample and `f` =
  |·| or (·)², which factor over products, it is `f(A)ᵀ f(Δ)`.
  """
  def flat(t):
    # Static position counts (the batch axis is traced unknown), so that the
    # one-position case is seen here.
    t = _f32(t)
    middle = t.shape[1:-1]
    positions = _size(middle) if middle.is_fully_defined() else -1
    return tf.reshape(t, [-1, positions, t.shape[-1]])

  a = tf.concat([flat(t) for t in inputs], axis=1)
  d = tf.concat([flat(t) for t in deltas], axis=1)
  if a.shape[1] == 1:
    return tf.matmul(transform(a[:, 0]), transform(d[:, 0]), transpose_a=True)

  def per_chunk(a, d):
    return [tf.reduce_sum(transform(tf.einsum("bpi,bpj->bij", a, d)), axis=0)]

  return _chunked_sum(per_chunk, [a, d], a.shape[-1] * d.shape[-1])[0]


def _reduce_to(delta, shape):
  """Per-sample gradient of a parameter of `shape` added to `delta`'s
  output by broadcasting (right-aligned): `(batch, *shape)`."""
  delta = _f32(delta)
  rank = len(delta.shape) - 1
  lead = list(range(1, 1 + rank - len(shape)))
  if lead:
    delta = tf.reduce_sum(delta, axis=lead)
  ones = [i + 1 for i, s in enumerate(shape) if s == 1 and (
      delta.shape[i + 1] != 1)]
  if ones:
    delta = tf.reduce_sum(delta, axis=ones, keepdims=True)
  return delta


@contextlib.contextmanager
def largest_batch(size):
  """Tells the forms traced inside how large a batch can be.

  Steps are traced with an unknown batch axis (one trace serves the short
  last batch too); knowing the bound lets a form that fits in one chunk
  skip the chunking loop, which would double its graph.
  """
  global _LARGEST_BATCH
  previous, _LARGEST_BATCH = _LARGEST_BATCH, size
  try:
    yield
  finally:
    _LARGEST_BATCH = previous


_LARGEST_BATCH = None


def _chunked_sum(per_chunk, tensors, per_sample_values):
  """`per_chunk(*tensors)` summed over chunks of the batch axis.

  `per_chunk` returns a list of batch-summed tensors. Chunks hold at most
  `_CHUNK_VALUES` values of per-sample work, so memory does not grow with
  the batch.
  """
  chunk = max(1, _CHUNK_VALUES // max(1, per_sample_values))
  static = tensors[0].shape[0]
  if static is None:
    static = _LARGEST_BATCH
  if static is not None and static <= chunk:
    return per_chunk(*tensors)
  count = tf.shape(tensors[0])[0]
  first = per_chunk(*[t[:chunk] for t in tensors])

  def body(start, totals):
    part = per_chunk(*[t[start:start + chunk] for t in tensors])
    return start + chunk, [a + b for a, b in zip(totals, part)]

  _, totals = tf.while_loop(lambda start, _: start < count, body,
                            [tf.constant(chunk), first])
  return totals


def _per_example_sums(loss, inputs, variables, transform):
  """`Σ_k f(∂ loss(sample k) / ∂ variables)`, one sample per iteration.

  Memory is one gradient per variable whatever the batch size; several
  iterations run at once (`parallel_iterations`).
  """
  tensors = tf.nest.flatten(inputs, expand_composites=False)
  batch_tensors = [t for t in tensors if tf.is_tensor(t) and t.shape.rank]
  count = tf.shape(batch_tensors[0])[0]

  def one(t, k):
    # A static batch of one: a layer that cannot run on one sample fails
    # while tracing, where the error can name it.
    sample = t[k:k + 1]
    sample.set_shape([1] + t.shape[1:].as_list())
    return sample

  def take(k):
    return tf.nest.map_structure(
        lambda t: one(t, k) if tf.is_tensor(t) and t.shape.rank else t,
        inputs)

  def body(k, totals):
    with tf.GradientTape() as tape:
      value = loss(take(k))
    grads = tape.gradient(value, variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return k + 1, [t + transform(_f32(g)) for t, g in zip(totals, grads)]

  _, totals = tf.while_loop(
      lambda k, _: k < count, body,
      [tf.constant(0), [tf.zeros(v.shape, tf.float32) for v in variables]],
      parallel_iterations=8)
  return totals


# Keras's own recurrent layers vectorize safely (no einsum, whose
# vectorized gradient crashes TF 2.21), and faster than the loop
# (benchmarks/CHOICES.md): local MAS re-runs them so.
_VECTORIZABLE = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)

# Recurrent layers whose per-step closed form `_recurrent_loop` computes.
_RECURRENT = _VECTORIZABLE


def _vectorized_sums(loss, inputs, variables, transform):
  """As `_per_example_sums`, vectorized over chunks of samples.

  Memory is a chunk's per-sample gradients (`_CHUNK_VALUES` at most).
  """
  flat = tf.nest.flatten(inputs)
  mapped = [i for i, t in enumerate(flat) if tf.is_tensor(t) and t.shape.rank]

  def one(sample):
    values = list(flat)
    for i, t in zip(mapped, sample):
      values[i] = tf.expand_dims(t, 0)
    with tf.GradientTape() as tape:
      value = loss(tf.nest.pack_sequence_as(inputs, values))
    return tape.gradient(value, variables,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def per_chunk(*chunk):
    grads = tf.vectorized_map(one, list(chunk))
    return [tf.reduce_sum(transform(_f32(g)), axis=0) for g in grads]

  return _chunked_sum(per_chunk, [flat[i] for i in mapped],
                      sum(_size(v.shape) for v in variables))


# --------------------------------------------------------------------------
# Recurrent layers: closed forms per time step.
#
# A cell's pre-activations at step t are `x_t·W + b + h_{t-1}·U` (GRU's
# candidate: `x_t·W + r_t ⊙ (h_{t-1}·U + b')`, or `(r_t ⊙ h_{t-1})·U`). The
# input projection `x·W + b` of the whole sequence is computed before the
# loop and is the tap: its gradient `δ_t` is the gradient at step t's
# pre-activations. Per sample, W gets `Σ_t x_tᵀ δ_t`, U gets
# `Σ_t h_{t-1}ᵀ δ_t` (through `r_t` for GRU's candidate), b `Σ_t δ_t`, from
# the states `h_{t-1}` each step started from.


def _recurrent_recording_call(layer, records):
  """The layer's own call, its loop replaced by `_recurrent_loop`."""
  original = functools.partial(type(layer).call, layer)

  def call(*args, **kwargs):
    steps = {}

    def inner_loop(sequences, initial_state, mask, training=False):
      cell = layer.cell
      if training and (cell.dropout or cell.recurrent_dropout):
        # Dropout masks: the layer's own loop (importance never trains).
        return type(layer).inner_loop(layer, sequences, initial_state, mask,
                                      training)
      return _recurrent_loop(layer, sequences, initial_state, mask, steps)

    with _replaced_attribute(layer, "inner_loop", inner_loop):
      output = original(*args, **kwargs)
    if steps:
      records.append(_Record((args, kwargs), [steps["projected"]], output,
                             steps))
    else:
      records.append(_Record((args, kwargs), tf.nest.flatten(output), output))
    return output

  return call


def _recurrent_biases(cell):
  """The bias added to the input projection, and the one inside the loop."""
  if cell.bias is None:
    return None, None
  if isinstance(cell, keras.layers.GRUCell) and cell.reset_after:
    return cell.bias[0], cell.bias[1]
  return cell.bias, None


def _recurrent_loop(layer, sequences, initial_state, mask, steps):
  """`inner_loop` of LSTM, GRU, SimpleRNN, recording into `steps`.

  The same computation as the cell's (inference: no dropout), with the
  input projection taken out of the loop. The state each step starts from
  is the previous step's output; with a mask, a masked step's output is
  not its state, so each step returns its starting state too.
  """
  cell = layer.cell
  units = cell.units
  if isinstance(mask, (list, tuple)):
    mask = mask[0]
  input_bias, recurrent_bias = _recurrent_biases(cell)
  projected = ops.matmul(sequences, cell.kernel)
  if input_bias is not None:
    projected = projected + input_bias
  returns_start = mask is not None
  step = _recurrent_step(cell, recurrent_bias, returns_start)
  last, outputs, states = keras_backend.rnn(
      step, projected, list(initial_state), go_backwards=layer.go_backwards,
      mask=mask, unroll=layer.unroll, input_length=sequences.shape[1],
      zero_output_for_mask=layer.zero_output_for_mask,
      return_all_outputs=True)
  if returns_start:
    previous = outputs[..., units:]
    last, outputs = last[..., :units], outputs[..., :units]
  else:
    previous = ops.concatenate(
        [ops.expand_dims(initial_state[0], 1), outputs[:, :-1]], axis=1)
  if layer.go_backwards:  # Back to the order of the inputs and taps.
    previous = ops.flip(previous, axis=1)
  steps.update(inputs=sequences, projected=projected, previous=previous)
  return last, outputs, states


def _recurrent_step(cell, recurrent_bias, returns_start):
  """One step from the projected input: `output, new_states`, the output
  followed by the starting state if `returns_start`."""
  units = cell.units
  kernel = cell.recurrent_kernel

  def output(h, h_prev):
    return ops.concatenate([h, h_prev], axis=-1) if returns_start else h

  def lstm(projected, states):
    h_prev, c_prev = states
    z = projected + ops.matmul(h_prev, kernel)
    z0, z1, z2, z3 = ops.split(z, 4, axis=-1)
    i, f = cell.recurrent_activation(z0), cell.recurrent_activation(z1)
    c = f * c_prev + i * cell.activation(z2)
    h = cell.recurrent_activation(z3) * cell.activation(c)
    return output(h, h_prev), [h, c]

  def simple(projected, states):
    h_prev = states[0]
    h = projected + ops.matmul(h_prev, kernel)
    if cell.activation is not None:
      h = cell.activation(h)
    return output(h, h_prev), [h]

  def gru(projected, states):
    h_prev = states[0]
    x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
    if cell.reset_after:
      inner = ops.matmul(h_prev, kernel)
      if recurrent_bias is not None:
        inner = inner + recurrent_bias
    else:
      inner = ops.matmul(h_prev, kernel[:, :2 * units])
    z = cell.recurrent_activation(x_z + inner[:, :units])
    r = cell.recurrent_activation(x_r + inner[:, units:2 * units])
    if cell.reset_after:
      recurrent_h = r * inner[:, 2 * units:]
    else:
      recurrent_h = ops.matmul(r * h_prev, kernel[:, 2 * units:])
    h = z * h_prev + (1 - z) * cell.activation(x_h + recurrent_h)
    return output(h, h_prev), [h]

  if isinstance(cell, keras.layers.LSTMCell):
    return lstm
  if isinstance(cell, keras.layers.GRUCell):
    return gru
  return simple


def _reset_gate(cell, projected, previous):
  """GRU's reset gate at every step, from the recorded tensors: one batched
  product instead of an extra output of each step."""
  units = cell.units
  kernel = _f32(cell.recurrent_kernel[:, units:2 * units])
  inner = ops.matmul(previous, kernel)
  _, recurrent_bias = _recurrent_biases(cell)
  if recurrent_bias is not None:
    inner += _f32(recurrent_bias[units:2 * units])
  return cell.recurrent_activation(projected[..., units:2 * units] + inner)


def _recurrent_sums(unit, records, deltas, transform):
  """`Σ_k f(g_k)` of a recurrent layer's kernel, recurrent kernel, bias."""
  cell = unit.layer.cell
  units = cell.units
  inputs = [r.steps["inputs"] for r in records]
  previous = [_f32(r.steps["previous"]) for r in records]
  projected = [_f32(d[0]) for d in deltas]
  gru = isinstance(cell, keras.layers.GRUCell)
  resets = [_reset_gate(cell, _f32(r.steps["projected"]), h)
            for r, h in zip(records, previous)] if gru else None
  if gru and cell.reset_after:
    # The recurrent candidate `h_{t-1}·U + b'` is scaled by r_t.
    recurrent = [d * tf.concat([tf.ones_like(d[..., :2 * units]), r], -1)
                 for r, d in zip(resets, projected)]
  else:
    recurrent = projected
  sums = {}
  if _measured(unit, cell.kernel):
    sums[id(cell.kernel)] = _outer_sums(inputs, projected, transform)
  if _measured(unit, cell.recurrent_kernel):
    if gru and not cell.reset_after:
      gates = _outer_sums(previous, [d[..., :2 * units] for d in projected],
                          transform)
      candidate = _outer_sums([h * r for h, r in zip(previous, resets)],
                              [d[..., 2 * units:] for d in projected],
                              transform)
      sums[id(cell.recurrent_kernel)] = tf.concat([gates, candidate], -1)
    else:
      sums[id(cell.recurrent_kernel)] = _outer_sums(previous, recurrent,
                                                    transform)
  if cell.bias is not None and _measured(unit, cell.bias):
    per_sample = tf.add_n([_time_sum(d) for d in projected])
    if gru and cell.reset_after:
      per_sample = tf.stack(
          [per_sample, tf.add_n([_time_sum(d) for d in recurrent])], axis=1)
    sums[id(cell.bias)] = tf.reduce_sum(transform(per_sample), axis=0)
  return sums


def _time_sum(t):
  return tf.reduce_sum(t, axis=list(range(1, len(t.shape) - 1)))


def _channels_last(layer, t):
  if getattr(layer, "data_format", "channels_last") == "channels_first":
    rank = len(t.shape)
    return tf.transpose(t, [0] + list(range(2, rank)) + [1])
  return t


def _bias_shape(layer, filters):
  rank = layer.rank
  if layer.data_format == "channels_last":
    return (1,) * (rank + 1) + (filters,)
  return (1, filters) + (1,) * rank


def _patches_supported(layer):
  rank = layer.rank
  padding = layer.padding
  if padding not in ("same", "valid", "causal"):
    return False
  if rank == 3 and any(d != 1 for d in layer.dilation_rate):
    return False  # tf.extract_volume_patches has no dilation.
  return rank in (1, 2, 3)


def _strided(layer, x):
  """The input at a pointwise (1×1) kernel's output positions."""
  return x[(slice(None),) + tuple(slice(None, None, s) for s in layer.strides)]


def _patches(layer, x):
  """Input patches `(batch, positions, taps·channels)`, kernel order."""
  rank = layer.rank
  padding = "VALID" if layer.padding in ("valid", "causal") else "SAME"
  strides, dilation = list(layer.strides), list(layer.dilation_rate)
  if all(k == 1 for k in layer.kernel_size):
    # A 1×1 kernel's patches are the (strided) input itself: no copy.
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])
  if rank == 1:
    x = x[:, None]
    sizes, strides, dilation = [1, 1, layer.kernel_size[0], 1], [
        1, 1, strides[0], 1], [1, 1, dilation[0], 1]
  elif rank == 2:
    sizes = [1, *layer.kernel_size, 1]
    strides, dilation = [1, *strides, 1], [1, *dilation, 1]
  if rank in (1, 2):
    patches = tf.image.extract_patches(x, sizes=sizes, strides=strides,
                                       rates=dilation, padding=padding)
  else:
    patches = tf.extract_volume_patches(
        x, ksizes=[1, *layer.kernel_size, 1], strides=[1, *strides, 1],
        padding=padding)
  return tf.reshape(patches, [tf.shape(x)[0], -1, patches.shape[-1]])
