"""Parameter importance estimators: global MAS, local (Hebbian) MAS.

Each estimator is a pure function of a built model and some data. It returns
one float32 tensor per entry of `model.trainable_variables`, in that order and
with the same shapes, and changes no variable of the model: the forward passes
run in inference mode (dropout off, BatchNorm reading its moving statistics).

Exact per-sample importance, `mean_k |g_k|`, is computed in one of two ways:

* Dense and Conv2D layers, analytically: the per-sample gradient of a kernel
  is `Σ_p a_kp ⊗ δ_kp`, the layer input (for a convolution, its patches)
  times the gradient at the pre-activation, summed over the positions `p`
  where sample `k` met the layer. With one position (a Dense layer on flat
  inputs) `Σ_k |a_k ⊗ δ_k| = |A|ᵀ|Δ|` is one matrix product, about the cost
  of the batched approximation.
* Any other layer: per-sample gradients vectorized over the batch with
  `tf.vectorized_map`, whose memory grows as batch size × parameter count.
  The analytic form is used when every trainable variable of the model
  belongs to a layer that has one.
"""

import contextlib
import weakref

import keras
import tensorflow as tf

from keras_mas import _data

__all__ = ["fisher", "local_mas", "mas", "path_integral", "squared_output_norm",
           "uniform"]

# Layers whose local (Hebbian) importance is the layer's own per-sample
# gradient; anything else has no clear "own output" and is refused.
_LOCAL_LAYER_TYPES = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
)

# Compiled per-batch functions, kept per model so that importance passes
# over several tasks reuse one trace instead of retracing every time.
_COMPILED = weakref.WeakKeyDictionary()


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


def mas(model, data, per_sample=True, num_samples=None, batch_size=32,
        output_fn=None):
  """Global MAS importance (Aljundi et al. 2018, eq. 2-3).

  `Ω = (1/N) Σ_k |∂‖F(x_k)‖²₂ / ∂θ|`: the gradient of the squared L2 norm of
  the model's output, its absolute value taken per sample, then averaged over
  the `N` samples. Labels are never used.

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
    batch_size: batch size when `data` is an array.
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
  kind = _per_sample_kind(model, variables) if per_sample else "batched"
  key = ("mas", kind, output_fn)
  step = _compiled(model, key, lambda: _make_global_step(
      model, kind, _output_norm(output_fn), tf.abs))
  return _average(model, key, step, variables, data, batch_size, num_samples)


def local_mas(model, data, num_samples=None, batch_size=32):
  """Local MAS importance (l-MAS): Hebb's rule, generalised.

  For every layer, the per-sample absolute gradient of the squared L2 norm of
  *that layer's own output* with respect to *its own parameters*, the layer's
  input held fixed, averaged over samples. For a ReLU Dense unit
  `y_j = relu(Σ_i θ_ij y_i)` this is `2·|y_i·y_j|`: the co-activation of the
  two neurons. No gradient flows between layers.

  Example:

  ```python
  omega = keras_mas.importance.local_mas(model, x_unlabeled)
  ```

  Args:
    model: a built `keras.Model` whose trainable variables all belong to
      Dense, EinsumDense, convolution or normalization layers.
    data: as for `mas`.
    num_samples: use at most this many samples of `data`.
    batch_size: batch size when `data` is an array.

  Returns:
    A list of float32 tensors, one per `model.trainable_variables`.

  Raises:
    ValueError: if a trainable variable belongs to a layer type that l-MAS
      cannot handle (the layer is named), or as for `mas`.
  """
  variables = _check_model(model)
  owners = _owning_layers(model, variables)
  for layer in owners:
    if layer is model or not isinstance(layer, _LOCAL_LAYER_TYPES):
      raise ValueError(
          "Invalid value for argument `model`. local_mas supports layers of "
          f"types {sorted(t.__name__ for t in _LOCAL_LAYER_TYPES)}. "
          f"Received: layer '{layer.name}' of type {type(layer).__name__} "
          "with trainable variables"
      )
  key = ("local_mas",)
  step = _compiled(model, key,
                   lambda: _make_local_step(model, variables, owners))
  return _average(model, key, step, variables, data, batch_size, num_samples)


def fisher(model, data, empirical=True, num_samples=None, batch_size=32,
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
  """
  variables = _check_model(model)
  kind = _per_sample_kind(model, variables)
  key = ("fisher", kind, bool(empirical), output_fn, seed)

  def log_likelihood(outputs, y):
    logits = tf.cast(output_fn(outputs) if output_fn else outputs, tf.float32)
    if empirical:
      labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
    else:
      labels = tf.stop_gradient(tf.cast(tf.random.stateless_categorical(
          logits, 1, seed=[seed, tf.shape(logits)[0]])[:, 0], tf.int32))
    return -tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))

  step = _compiled(model, key, lambda: _make_global_step(
      model, kind, log_likelihood, tf.square))
  return _average(model, key, step, variables, data, batch_size, num_samples,
                  labels=bool(empirical))


def uniform(model, data=None, **unused_options):
  """Ω = 1 for every parameter: the plain L2 penalty towards the anchors."""
  del data, unused_options
  return [tf.ones(v.shape, tf.float32) for v in _check_model(model)]


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
  path = getattr(model, "_si_path", None)
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

  Under a `tf.distribute` strategy with several replicas (the model's own,
  or the one in scope), each batch is split among the replicas, every
  replica sums over its share and the sums are added across replicas (and
  workers) before the division by the global sample count.
  """
  strategy = getattr(model, "distribute_strategy", tf.distribute.get_strategy())
  if strategy.num_replicas_in_sync > 1:
    per_batch = _compiled(model, ("distributed",) + key,
                          lambda: _distributed(step, strategy))
    run = lambda x: per_batch(_replica_shares(strategy, x))
  else:
    run = step
  totals = [tf.zeros(v.shape, tf.float32) for v in variables]
  count = 0
  for batch in _data.input_batches(data, batch_size, num_samples, labels):
    x = batch[0]
    try:
      sums = run(batch)
    except (ValueError, TypeError, tf.errors.OpError) as e:
      shapes = tf.nest.map_structure(lambda t: tuple(t.shape), x)
      raise ValueError(
          "Invalid value for argument `data`. Expected inputs that model "
          f"'{model.name}' accepts. Received: a batch of shape {shapes}. "
          f"The model raised: {e}"
      ) from e
    totals = [t + s for t, s in zip(totals, sums)]
    count += int(tf.shape(tf.nest.flatten(x)[0])[0])
  return [t / count for t in totals]


def _distributed(step, strategy):
  @tf.function(reduce_retracing=True)
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


def _owning_layers(model, variables):
  """The innermost layer that created each variable, in variable order."""
  owner_by_id = {}
  for layer in [model] + list(model._flatten_layers(include_self=False)):
    for v in layer._trainable_variables:
      owner_by_id[id(v)] = layer
  return [owner_by_id.get(id(v), model) for v in variables]


def _call_model(model, x):
  return model(x, training=False)


@contextlib.contextmanager
def _replaced_call(layer, new_call):
  # Keras's `__call__` looks `call` up on the instance, so an instance
  # attribute intercepts it without touching the class or the layer's state.
  object.__setattr__(layer, "call", new_call)
  try:
    yield
  finally:
    object.__delattr__(layer, "call")


def _zeros_for_missing(grads, variables):
  return [
      tf.zeros(v.shape, tf.float32) if g is None else tf.cast(g, tf.float32)
      for g, v in zip(grads, variables)
  ]


# --------------------------------------------------------------------------
# Global MAS.


def _output_norm(output_fn):
  """MAS's objective: `Σ_k ‖F(x_k)‖²`, labels unused."""

  def objective(outputs, y):
    del y
    if output_fn is not None:
      outputs = output_fn(outputs)
    return tf.reduce_sum(squared_output_norm(outputs))

  return objective


def _make_global_step(model, kind, objective, transform):
  """Per batch, `Σ_k transform(∂ objective_k / ∂θ)` for every variable.

  `objective(outputs, y)` must be a sum of per-sample terms; `transform` is
  `tf.abs` (MAS) or `tf.square` (Fisher), applied per sample, or to the
  batch's summed gradient for `kind="batched"`.
  """
  variables = list(model.trainable_variables)

  def loss_of(batch):
    x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    return objective(_call_model(model, x), y)

  if kind == "batched":

    def step(batch):
      with tf.GradientTape() as tape:
        loss = loss_of(batch)
      grads = _zeros_for_missing(tape.gradient(loss, variables), variables)
      return [transform(g) for g in grads]

  elif kind == "vectorized":

    def step(batch):
      def one_sample(sample):
        sample = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), sample)
        with tf.GradientTape() as tape:
          loss = loss_of(sample)
        return _zeros_for_missing(tape.gradient(loss, variables), variables)

      grads = tf.vectorized_map(one_sample, batch)
      return [tf.reduce_sum(transform(g), axis=0) for g in grads]

  else:
    layers = _analytic_layers(model, variables)

    def step(batch):
      records = {id(layer): [] for layer in layers}
      with contextlib.ExitStack() as stack:
        for layer in layers:
          stack.enter_context(
              _replaced_call(layer, _recording_call(layer, records)))
        with tf.GradientTape() as tape:
          loss = loss_of(batch)
      pre_activations = [z for layer in layers for _, z in records[id(layer)]]
      deltas = iter(tape.gradient(loss, pre_activations))
      sums = {}
      for layer in layers:
        inputs = [a for a, _ in records[id(layer)]]
        layer_deltas = [next(deltas) for _ in inputs]
        if inputs:  # Else not on the path from the inputs: importance 0.
          sums.update(_layer_grad_sums(layer, inputs, layer_deltas,
                                       transform))
      return [sums.get(id(v), tf.zeros(v.shape, tf.float32))
              for v in variables]

  return tf.function(step, reduce_retracing=True)


def _analytic_kind(layer):
  """"dense" or "conv2d" if `layer` has an analytic per-sample form."""
  # pylint: disable=unidiomatic-typecheck
  if getattr(layer, "lora_enabled", False) or getattr(
      layer, "quantization_mode", None) is not None:
    return None
  if type(layer) is keras.layers.Dense:
    return "dense"
  if (type(layer) is keras.layers.Conv2D and layer.groups == 1
      and layer.data_format == "channels_last"
      and layer.padding in ("same", "valid")):
    return "conv2d"
  return None


def _per_sample_kind(model, variables):
  """"analytic" when every variable's layer has a closed per-sample form."""
  if _analytic_layers(model, variables) is not None:
    return "analytic"
  return "vectorized"


def _analytic_layers(model, variables):
  """The analytic layers owning every variable, or None if some do not."""
  layers = []
  for layer, v in zip(_owning_layers(model, variables), variables):
    if _analytic_kind(layer) is None or not (
        v is layer._kernel or v is layer.bias):
      return None
    if layer not in layers:
      layers.append(layer)
  return layers


def _pre_activation(layer, inputs):
  """The layer's output before its activation."""
  if _analytic_kind(layer) == "dense":
    z = keras.ops.matmul(inputs, layer.kernel)
  else:
    z = layer.convolution_op(inputs, layer.kernel)
  if layer.bias is not None:
    z = keras.ops.add(z, layer.bias)
  return z


def _activation(layer, z):
  return layer.activation(z) if layer.activation is not None else z


def _recording_call(layer, records):
  """The layer's call, recording the input and pre-activation of each call."""

  def call(inputs, *args, **kwargs):
    del args, kwargs
    z = _pre_activation(layer, inputs)
    records[id(layer)].append((inputs, z))
    return _activation(layer, z)

  return call


def _layer_grad_sums(layer, inputs, deltas, transform=tf.abs):
  """`{id(variable): Σ_k transform(per-sample gradient)}`, kernel and bias."""
  if _analytic_kind(layer) == "conv2d":
    inputs = [_patches(layer, a) for a in inputs]
  kernel_sum, bias_sum = _outer_grad_sums(inputs, deltas, transform)
  sums = {id(layer._kernel): tf.reshape(kernel_sum, layer._kernel.shape)}
  if layer.bias is not None:
    sums[id(layer.bias)] = bias_sum
  return sums


def _patches(layer, inputs):
  """Conv2D input patches, flattened in the kernel's (kh, kw, cin) order."""
  kh, kw = layer.kernel_size
  sh, sw = layer.strides
  dh, dw = layer.dilation_rate
  return tf.image.extract_patches(
      tf.cast(inputs, tf.float32), sizes=[1, kh, kw, 1],
      strides=[1, sh, sw, 1], rates=[1, dh, dw, 1],
      padding=layer.padding.upper())


def _outer_grad_sums(inputs, deltas, transform):
  """`Σ_k f(Σ_p a_kp ⊗ δ_kp)` and `Σ_k f(Σ_p δ_kp)` over a layer's calls.

  `p` runs over every position at which sample `k` met the layer: extra input
  axes (a Dense layer on sequences, a convolution's patches) and repeated
  calls (a shared layer). With one position per sample and `f` = |·| or (·)²,
  which factor over products, the sum of outer products is a single matmul:
  `f(A)ᵀ f(Δ)`; otherwise the per-sample kernel gradient is formed.
  """
  def flat(t):
    t = tf.cast(t, tf.float32)
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])

  a = tf.concat([flat(t) for t in inputs], axis=1)
  d = tf.concat([flat(t) for t in deltas], axis=1)
  if a.shape[1] == 1:
    a, d = a[:, 0], d[:, 0]
    return (tf.matmul(transform(a), transform(d), transpose_a=True),
            tf.reduce_sum(transform(d), axis=0))
  per_sample = tf.einsum("bpi,bpj->bij", a, d)
  return (tf.reduce_sum(transform(per_sample), axis=0),
          tf.reduce_sum(transform(tf.reduce_sum(d, axis=1)), axis=0))


# --------------------------------------------------------------------------
# Local MAS.


def _make_local_step(model, variables, owners):
  layers = []
  for layer in owners:
    if layer not in layers:
      layers.append(layer)

  def recording_call(layer, original, records):
    def call(inputs, *args, **kwargs):
      records[id(layer)].append(inputs)
      return original(inputs, *args, **kwargs)
    return call

  def step(batch):
    records = {id(layer): [] for layer in layers}
    with contextlib.ExitStack() as stack:
      for layer in layers:
        stack.enter_context(_replaced_call(
            layer, recording_call(layer, layer.call, records)))
      _call_model(model, batch[0])
    sums = {}
    for layer in layers:
      inputs = records[id(layer)]
      if not inputs:
        continue  # Not on the path from these inputs: importance stays 0.
      if _analytic_kind(layer) is not None:
        sums.update(_local_analytic(layer, inputs))
      else:
        sums.update(_local_vectorized(layer, inputs))
    return [sums.get(id(v), tf.zeros(v.shape, tf.float32)) for v in variables]

  return tf.function(step, reduce_retracing=True)


def _local_analytic(layer, inputs):
  pre_activations = []
  with tf.GradientTape() as tape:
    loss = 0.0
    for a in inputs:
      z = _pre_activation(layer, tf.stop_gradient(a))
      pre_activations.append(z)
      loss += tf.reduce_sum(tf.square(tf.cast(_activation(layer, z),
                                              tf.float32)))
  deltas = tape.gradient(loss, pre_activations)
  return _layer_grad_sums(layer, inputs, deltas)


def _local_vectorized(layer, inputs):
  variables = list(layer.trainable_variables)

  def one_sample(inputs_k):
    with tf.GradientTape() as tape:
      loss = 0.0
      for a in inputs_k:
        y = layer(tf.expand_dims(a, 0), training=False)
        loss += tf.reduce_sum(tf.square(tf.cast(y, tf.float32)))
    return _zeros_for_missing(tape.gradient(loss, variables), variables)

  grads = tf.vectorized_map(one_sample, [tf.stop_gradient(a) for a in inputs])
  return {
      id(v): tf.reduce_sum(tf.abs(g), axis=0) for v, g in zip(variables, grads)
  }
