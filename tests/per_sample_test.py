"""Each layer's per-sample form against a per-example GradientTape loop."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import importance
from keras_mas import per_sample
import capabilities
import tolerances

_RNG = np.random.default_rng(0)


def _reference(model, x, loss_fn, transform=np.abs, y=None):
  """The definition: one sample at a time, a GradientTape each."""
  variables = model.trainable_variables
  totals = [np.zeros(v.shape) for v in variables]
  n = len(tf.nest.flatten(x)[0])
  for k in range(n):
    sample = tf.nest.map_structure(lambda t, k=k: t[k:k + 1], x)
    with tf.GradientTape() as tape:
      if y is None:
        loss = loss_fn(model(sample, training=False))
      else:
        loss = loss_fn(model(sample, training=False), y[k:k + 1])
    for t, g in zip(totals, tape.gradient(
        loss, variables, unconnected_gradients="zero")):
      t += transform(tf.convert_to_tensor(g).numpy().astype("float64"))
  return [t / n for t in totals]


def _norm(outputs):
  return tf.add_n([tf.reduce_sum(tf.square(tf.cast(o, "float32")))
                   for o in tf.nest.flatten(outputs)])


def _assert_close(actual, expected, rtol=tolerances.RTOL):
  """`tolerances.assert_all_close`, with an absolute tolerance for gradients.

  A per-sample gradient through a normalization or attention is a sum of
  terms that nearly cancel: its rounding is relative to the terms, so each
  array's absolute tolerance is `rtol` times its largest value, and at least
  `tolerances.ATOL_OF_SCALE` times the largest value of all the arrays (a
  variable whose true gradient vanishes, as attention's key bias, holds
  rounding noise only).

  Args:
    actual: the measured arrays, one per variable.
    expected: the reference arrays.
    rtol: relative tolerance per element.
  """
  actual, expected = list(actual), list(expected)
  assert len(actual) == len(expected), (len(actual), len(expected))
  scales = [float(np.max(np.abs(e))) if np.size(e) else 0.0 for e in expected]
  floor = tolerances.ATOL_OF_SCALE * max(scales, default=0.0)
  for i, (a, e, scale) in enumerate(zip(actual, expected, scales)):
    tolerances.assert_close(a, e, rtol=rtol, atol=max(rtol * scale, floor),
                            err_msg=f"entry {i}")


def _kinds(model):
  return [type(u).__name__ for u in per_sample.plan(
      model, model.trainable_variables)]


def _sequential(input_shape, *layers, dtype="float32"):
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers])


def _x(*shape):
  return _RNG.normal(size=shape).astype("float32")


def _lora_dense():
  layer = keras.layers.Dense(4, activation="tanh")
  layer.build((None, 3, 5))
  layer.enable_lora(2)
  # Non-zero B so that both factors have gradients.
  layer.lora_kernel_b.assign(_x(2, 4))
  return layer


def _lora_einsum():
  layer = keras.layers.EinsumDense("abc,cd->abd", (3, 4), bias_axes="d")
  layer.build((None, 3, 5))
  layer.enable_lora(2)
  layer.lora_kernel_b.assign(_x(2, 4))
  return layer


def _trained_batchnorm():
  layer = keras.layers.BatchNormalization()
  layer.build((None, 4, 4, 3))
  layer.moving_mean.assign(_x(3))
  layer.moving_variance.assign(np.abs(_x(3)) + 0.5)
  layer.gamma.assign(_x(3))
  layer.beta.assign(_x(3))
  return layer


CASES = {
    "dense_sequence": ((3, 5), lambda: [
        keras.layers.Dense(4, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(2)], "DenseUnit"),
    "dense_lora": ((3, 5), lambda: [_lora_dense(), keras.layers.Flatten()],
                   "DenseUnit"),
    "einsum_sequence": ((3, 5), lambda: [
        keras.layers.EinsumDense("abc,cd->abd", (3, 4), bias_axes="d",
                                 activation="gelu")], "EinsumDenseUnit"),
    "einsum_outer": ((5,), lambda: [
        keras.layers.EinsumDense("ab,bc->ac", 4, bias_axes="c")],
                     "EinsumDenseUnit"),
    "einsum_ellipsis_heads": ((3, 6), lambda: [
        keras.layers.EinsumDense("...b,bhd->...hd", (2, 3), bias_axes="hd")],
                              "EinsumDenseUnit"),
    "einsum_lora": ((3, 5), lambda: [_lora_einsum()], "EinsumDenseUnit"),
    "conv1d_causal_dilated": ((9, 3), lambda: [
        keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2,
                            activation="relu")], "ConvUnit"),
    "conv1d_groups": ((8, 4), lambda: [
        keras.layers.Conv1D(6, 3, groups=2, strides=2)], "ConvUnit"),
    "conv2d_channels_first": ((2, 6, 6), lambda: [
        keras.layers.Conv2D(3, 3, padding="same", data_format="channels_first",
                            activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(2)], "ConvUnit"),
    "conv2d_1x1_strided": ((5, 5, 3), lambda: [
        keras.layers.Conv2D(4, 1, strides=2, padding="same"),
        keras.layers.Conv2D(2, 1, strides=2)], "ConvUnit"),
    "conv3d": ((4, 4, 4, 2), lambda: [
        keras.layers.Conv3D(3, 2, strides=(1, 2, 1))], "ConvUnit"),
    "depthwise2d": ((6, 6, 3), lambda: [
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2,
                                     padding="same", activation="relu")],
                    "DepthwiseConvUnit"),
    "depthwise1d": ((7, 3), lambda: [
        keras.layers.DepthwiseConv1D(3, dilation_rate=2)],
                    "DepthwiseConvUnit"),
    "separable2d": ((6, 6, 3), lambda: [
        keras.layers.SeparableConv2D(4, 3, depth_multiplier=2,
                                     activation="relu")],
                   "SeparableConvUnit"),
    "separable1d": ((7, 2), lambda: [
        keras.layers.SeparableConv1D(3, 3, padding="same")],
                   "SeparableConvUnit"),
    # At least `per_sample._FOLDED_MIN_POSITIONS` output positions: the
    # batch folded into the channels of TensorFlow's filter gradient.
    "conv2d_folded_strided": ((12, 12, 3), lambda: [
        keras.layers.Conv2D(4, 3, strides=2, padding="same",
                            activation="relu")], "ConvUnit"),
    "conv2d_folded_dilated_groups": ((10, 10, 4), lambda: [
        keras.layers.Conv2D(6, 3, dilation_rate=2, groups=2)], "ConvUnit"),
    "conv1d_folded_strided": ((40, 3), lambda: [
        keras.layers.Conv1D(4, 3, strides=2, padding="same")], "ConvUnit"),
    "depthwise2d_folded": ((9, 9, 3), lambda: [
        keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2)],
                           "DepthwiseConvUnit"),
    "depthwise1d_folded": ((20, 3), lambda: [
        keras.layers.DepthwiseConv1D(3, depth_multiplier=2,
                                     padding="same")], "DepthwiseConvUnit"),
    # One output position a sample: `f` factors over the products.
    "conv_single_position": ((3, 3, 4), lambda: [
        keras.layers.Conv2D(6, 3, groups=2, activation="tanh"),
        keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
        keras.layers.Conv2D(3, 1)], "DepthwiseConvUnit"),
    "batchnorm_inference": ((4, 4, 3), lambda: [_trained_batchnorm()],
                            "NormalizationUnit"),
    "layernorm_two_axes": ((3, 4), lambda: [
        keras.layers.Dense(4),
        keras.layers.LayerNormalization(axis=[1, 2])], "NormalizationUnit"),
    "layernorm_rms": ((5,), lambda: [
        keras.layers.Dense(4), keras.layers.LayerNormalization(
            rms_scaling=True)], "NormalizationUnit"),
    "groupnorm": ((3, 6), lambda: [
        keras.layers.Dense(6), keras.layers.GroupNormalization(groups=3)],
                  "NormalizationUnit"),
    # Its output ignores the input's scale: gradients into layers before it
    # nearly cancel, so it comes first here to compare at 1e-4.
    "rmsnorm": ((3, 4), lambda: [
        keras.layers.RMSNormalization(), keras.layers.Dense(2)],
                "NormalizationUnit"),
    "lstm": ((4, 3), lambda: [keras.layers.LSTM(5)], "Fallback"),
    "gru_sequences": ((4, 3), lambda: [
        keras.layers.GRU(3, return_sequences=True)], "Fallback"),
    "simple_rnn_backwards": ((5, 3), lambda: [
        keras.layers.SimpleRNN(4, go_backwards=True, return_sequences=True)],
                             "Fallback"),
    "gru_reset_before_unrolled": ((4, 3), lambda: [
        keras.layers.GRU(3, reset_after=False, unroll=True)], "Fallback"),
    "lstm_without_bias": ((4, 3), lambda: [
        keras.layers.LSTM(2, use_bias=False, return_sequences=True),
        keras.layers.SimpleRNN(2, activation=None)], "Fallback"),
    "time_distributed": ((4, 3), lambda: [
        keras.layers.TimeDistributed(keras.layers.Dense(2))], "Fallback"),
    "prelu": ((5,), lambda: [keras.layers.Dense(4), keras.layers.PReLU()],
              "Fallback"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mas_matches_per_example_loop(name):
  if "channels_first" in name:
    capabilities.require_channels_first_conv()
  input_shape, layers, kind = CASES[name]
  model = _sequential(input_shape, *layers())
  assert kind in _kinds(model)
  x = _x(5, *input_shape)
  # Batched closed forms against single samples: sums taken apart.
  _assert_close(importance.mas(model, x, batch_size=3),
                _reference(model, x, _norm), rtol=1e-4)


def test_embedding_scatters_repeated_ids_per_sample():
  model = _sequential((6,), keras.layers.Embedding(7, 3),
                      keras.layers.Flatten(), keras.layers.Dense(2),
                      dtype="int32")
  assert _kinds(model)[0] == "EmbeddingUnit"
  ids = _RNG.integers(0, 7, size=(5, 6)).astype("int32")
  ids[0, :3] = 4  # One sample meets row 4 three times, with mixed signs.
  _assert_close(importance.mas(model, ids, batch_size=2),
                _reference(model, ids, _norm))


def test_fisher_uses_the_same_forms():
  model = _sequential((3, 5), keras.layers.EinsumDense("abc,cd->abd", (3, 4)),
                      keras.layers.LayerNormalization(), keras.layers.Flatten(),
                      keras.layers.Dense(3))
  x, y = _x(6, 3, 5), _RNG.integers(0, 3, size=6)

  def log_likelihood(logits, labels):
    return -tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, "int32"), logits=logits))

  _assert_close(importance.fisher(model, (x, y), batch_size=4),
                _reference(model, x, log_likelihood, np.square, y), rtol=1e-4)


def test_fisher_squares_the_convolution_and_recurrent_forms():
  # (·)² through the folded convolution, the single-position form and the
  # per-step recurrent form, as |·| is.
  model = _sequential((20, 3), keras.layers.Conv1D(4, 3, padding="same"),
                      keras.layers.GRU(3, reset_after=False,
                                       return_sequences=True),
                      keras.layers.SimpleRNN(2),
                      keras.layers.Reshape((1, 2)),
                      keras.layers.Conv1D(3, 1), keras.layers.Flatten())
  x, y = _x(6, 20, 3), _RNG.integers(0, 3, size=6)

  def log_likelihood(logits, labels):
    return -tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, "int32"), logits=logits))

  _assert_close(importance.fisher(model, (x, y), batch_size=4),
                _reference(model, x, log_likelihood, np.square, y), rtol=1e-4)


def test_convolution_and_recurrent_forms_in_mixed_precision():
  # float16 taps and δ meet float32 patches and states: cast, not mixed.
  policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = _sequential((12, 3), keras.layers.Conv1D(4, 3),
                        keras.layers.DepthwiseConv1D(3, padding="same"),
                        keras.layers.LSTM(3, return_sequences=True),
                        keras.layers.GRU(2), keras.layers.Dense(2))
    x = _x(4, 12, 3)
    _assert_close(importance.mas(model, x), _reference(model, x, _norm),
                  rtol=2e-2)
  finally:
    keras.mixed_precision.set_global_policy(policy)


def test_chunks_give_the_same_sums(monkeypatch):
  model = _sequential((3, 5), keras.layers.EinsumDense("abc,cd->abd", (3, 4)),
                      keras.layers.Conv1D(2, 2), keras.layers.GRU(2))
  x = _x(9, 3, 5)
  whole = importance.mas(model, x, batch_size=9)
  importance.estimators._COMPILED.pop(model, None)
  monkeypatch.setattr(per_sample, "_CHUNK_VALUES", 25)  # ~1 sample a chunk
  _assert_close(importance.mas(model, x, batch_size=9),
                [t.numpy() for t in whole])


def test_a_shared_convolution_sums_its_forms_per_sample(monkeypatch):
  # One call folded (many positions), one by patches (few), one a single
  # position: their per-sample gradients add up before |·|.
  forms = []
  original = per_sample._conv_form
  monkeypatch.setattr(per_sample, "_conv_form", lambda *args: forms.append(
      original(*args)) or forms[-1])
  keras.utils.set_random_seed(4)
  conv = keras.layers.Conv2D(3, 3, activation="tanh")
  sizes = {"many": 8, "few": 4, "one": 3}
  inputs = {k: keras.Input((n, n, 2), name=k) for k, n in sizes.items()}
  pooled = [keras.layers.GlobalAveragePooling2D()(conv(i))
            for i in inputs.values()]
  model = keras.Model(inputs, keras.layers.Dense(2)(
      keras.layers.Concatenate()(pooled)))
  x = {k: _x(5, n, n, 2) for k, n in sizes.items()}
  _assert_close(importance.mas(model, x, batch_size=3),
                _reference(model, x, _norm), rtol=1e-4)
  assert set(forms) == {"folded", "patches", "single"}, forms


def test_recurrent_layers_skip_masked_steps():
  # Masked steps carry the state over: no gradient there, nor through them.
  keras.utils.set_random_seed(6)
  inputs = keras.Input((6, 3))
  masked = keras.layers.Masking()(inputs)
  sequence, state = keras.layers.GRU(4, return_sequences=True,
                                     return_state=True, go_backwards=True)(
                                         masked)
  forward = keras.layers.Bidirectional(keras.layers.LSTM(
      2, zero_output_for_mask=True))(sequence)
  model = keras.Model(inputs, keras.layers.Concatenate()([forward, state]))
  assert _kinds(model) == ["Fallback"] * 3
  x = _x(5, 6, 3)
  x[0, 4:] = 0.0
  x[1, :2] = 0.0
  x[2, 2:4] = 0.0
  _assert_close(importance.mas(model, x, batch_size=3),
                _reference(model, x, _norm), rtol=1e-4)


class _Scale(keras.layers.Layer):
  """A custom layer with a weight of its own and a Dense sublayer."""

  def build(self, input_shape):
    self.dense = keras.layers.Dense(3)
    self.dense.build(input_shape)
    self.scale = self.add_weight(shape=(3,), initializer="ones")

  def call(self, inputs):
    return self.dense(inputs) * self.scale * tf.reduce_sum(inputs, -1,
                                                           keepdims=True)


class Net(keras.Model):
  """A subclassed model with a weight of its own, used outside any layer."""

  def __init__(self):
    super().__init__()
    self.dense = keras.layers.Dense(3)

  def build(self, input_shape):
    self.dense.build(input_shape)
    self.temperature = self.add_weight(shape=(), initializer="ones")

  def call(self, inputs):
    return self.dense(inputs) / self.temperature


def test_custom_layers_and_model_weights_fall_back_alone():
  model = _sequential((4,), keras.layers.Dense(4), _Scale())
  assert _kinds(model) == ["DenseUnit", "Fallback"]
  x = _x(5, 4)
  _assert_close(importance.mas(model, x), _reference(model, x, _norm),
                rtol=1e-4)
  keras.utils.set_random_seed(2)
  net = Net()
  net.build((None, 4))
  net.temperature.assign(1.5)
  assert _kinds(net) == ["DenseUnit", "ModelFallback"]
  _assert_close(importance.mas(net, x), _reference(net, x, _norm), rtol=1e-4)


def test_multi_head_attention_is_measured_through_its_einsums():
  keras.utils.set_random_seed(3)
  inputs = keras.Input((4, 6))
  attended = keras.layers.MultiHeadAttention(2, 3)(inputs, inputs)
  model = keras.Model(inputs, keras.layers.LayerNormalization()(
      inputs + attended))
  assert set(_kinds(model)) == {"EinsumDenseUnit", "NormalizationUnit"}
  x = _x(4, 4, 6)
  _assert_close(importance.mas(model, x), _reference(model, x, _norm),
                rtol=1e-4)


def test_local_mas_measures_each_layer_on_its_own_output():
  keras.utils.set_random_seed(5)
  embed = keras.layers.Embedding(6, 4)
  lstm = keras.layers.LSTM(3)
  head = keras.layers.Dense(2)
  model = _sequential((5,), embed, lstm, head, dtype="int32")
  ids = _RNG.integers(0, 6, size=(4, 5)).astype("int32")
  expected = []
  inputs = ids
  for layer in (embed, lstm, head):
    expected += _reference(layer, inputs, _norm)
    inputs = layer(inputs).numpy()
  _assert_close(importance.local_mas(model, ids), expected, rtol=1e-4)


def test_local_mas_output_fn_measures_one_head():
  keras.utils.set_random_seed(3)
  model = _sequential((5,), keras.layers.Dense(4, activation="relu"),
                      keras.layers.Dense(6))
  x = _x(5, 5)
  omega = importance.local_mas(model, x, output_fn=lambda out: out[:, :2])
  head_kernel = np.asarray(omega[2])
  # A hidden unit dead on every sample leaves its row at 0: columns, not
  # entries, of the measured head are positive.
  assert np.all(head_kernel[:, 2:] == 0)
  assert np.all(head_kernel[:, :2].sum(axis=0) > 0)
  assert np.all(np.asarray(omega[3])[2:] == 0)
  tolerances.assert_close(omega[0], importance.local_mas(model, x)[0])
  with pytest.raises(ValueError, match="argument `output_fn`"):
    importance.local_mas(
        _sequential((5,), keras.layers.Dense(4), keras.layers.Activation(
            "tanh")), x, output_fn=lambda out: out[:, :2])


def test_importance_changes_no_variable_and_keeps_calls_intact():
  model = _sequential((4, 4, 3), _trained_batchnorm(),
                      keras.layers.SeparableConv2D(2, 3),
                      keras.layers.Flatten(), keras.layers.Dense(2))
  x = _x(3, 4, 4, 3)
  before = [v.numpy().copy() for v in model.weights]
  out_before = model(x).numpy()
  importance.mas(model, x)
  importance.local_mas(model, x)
  for b, v in zip(before, model.weights):
    np.testing.assert_array_equal(b, v.numpy())
  np.testing.assert_array_equal(out_before, model(x).numpy())
  assert all("call" not in vars(layer) for layer in model.layers)


class _WholeBatch(keras.layers.Layer):
  """A layer that only works on batches of four: no per-sample gradient."""

  def build(self, input_shape):
    self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

  def call(self, inputs):
    return tf.reshape(inputs * self.w, [4, -1])


def test_a_layer_without_per_sample_gradients_is_named_and_nothing_changes():
  import keras_mas  # pylint: disable=g-import-not-at-top
  model = keras_mas.MASModel.from_model(
      _sequential((3,), keras.layers.Dense(3), _WholeBatch()))
  before = [np.asarray(o).copy() for o in model.importances]
  with pytest.raises(ValueError, match="^Invalid value for argument `model`.*whole_batch' of type "
                     "_WholeBatch"):
    model.consolidate(_x(4, 3), batch_size=4)
  for b, o in zip(before, model.importances):
    np.testing.assert_array_equal(b, np.asarray(o))
  assert model.consolidated_tasks == 0


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
