"""Importance estimators against NumPy per-sample references."""

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
import tolerances


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((5,)),
      keras.layers.Dense(7, activation="relu"),
      keras.layers.Dense(3),
  ])


def _numpy_mas(model, x, per_sample=True, batch_size=None):
  """Hand-derived gradients of ‖W2·relu(W1·x+b1)+b2‖² for a 2-layer MLP."""
  w1, b1, w2, b2 = [v.numpy().astype("float64") for v in model.weights]
  z1 = x @ w1 + b1
  h = np.maximum(z1, 0)
  out = h @ w2 + b2
  d_out = 2 * out
  d_z1 = (d_out @ w2.T) * (z1 > 0)
  grads = [np.einsum("bi,bj->bij", x, d_z1), d_z1,
           np.einsum("bi,bj->bij", h, d_out), d_out]
  if per_sample:
    return [np.abs(g).mean(axis=0) for g in grads]
  starts = range(0, len(x), batch_size)
  return [sum(np.abs(g[s:s + batch_size].sum(axis=0)) for s in starts)
          / len(x) for g in grads]


def _tf_per_sample_reference(model, x, fn):
  """The definition, one sample at a time with a GradientTape."""
  variables = model.trainable_variables
  totals = [np.zeros(v.shape) for v in variables]
  for k in range(len(x)):
    with tf.GradientTape() as tape:
      loss = fn(model, x[k:k + 1])
    for t, g in zip(totals, tape.gradient(loss, variables)):
      t += np.abs(g.numpy())
  return [t / len(x) for t in totals]


def _all_closed_form(model):
  return not any(isinstance(u, per_sample.Fallback) for u in per_sample.plan(
      model, model.trainable_variables))


def _global_loss(model, x):
  return tf.reduce_sum(tf.square(model(x, training=False)))


def test_mas_matches_numpy_per_sample_reference_with_short_last_batch():
  model = _mlp()
  x = np.random.default_rng(0).normal(size=(10, 5)).astype("float32")
  dataset = tf.data.Dataset.from_tensor_slices(
      (x, np.zeros(10, "int64"))).batch(4)  # 4 + 4 + 2: short last batch
  expected = _numpy_mas(model, x.astype("float64"))
  tolerances.assert_all_close(importance.mas(model, dataset), expected)
  tolerances.assert_all_close(importance.mas(model, x, batch_size=3), expected)


def test_batched_approximation_matches_numpy():
  model = _mlp()
  x = np.random.default_rng(1).normal(size=(10, 5)).astype("float32")
  expected = _numpy_mas(model, x.astype("float64"), per_sample=False,
                        batch_size=4)
  tolerances.assert_all_close(
      importance.mas(model, x, per_sample=False, batch_size=4), expected)
  exact = importance.mas(model, x)
  # |Σ g| ≤ Σ |g|: the approximation never exceeds the exact value.
  for approx, ex in zip(expected, exact):
    assert np.all(approx <= ex.numpy() + 1e-5)


def test_num_samples_caps_the_data():
  model = _mlp()
  x = np.random.default_rng(2).normal(size=(10, 5)).astype("float32")
  tolerances.assert_all_close(
      importance.mas(model, x, num_samples=6, batch_size=4),
      _numpy_mas(model, x[:6].astype("float64")))


def test_vectorized_path_matches_definition_with_batchnorm_dropout_conv():
  keras.utils.set_random_seed(3)
  model = keras.Sequential([
      keras.Input((6, 6, 2)),
      keras.layers.Conv2D(3, 3, activation="relu"),
      keras.layers.BatchNormalization(),
      keras.layers.Dropout(0.5),
      keras.layers.Flatten(),
      keras.layers.Dense(4),
  ])
  x = np.random.default_rng(3).normal(size=(7, 6, 6, 2)).astype("float32")
  expected = _tf_per_sample_reference(model, x, _global_loss)
  tolerances.assert_all_close(importance.mas(model, x, batch_size=3),
                              expected, rtol=1e-4)


def test_dense_fast_path_handles_sequences_and_shared_layers():
  keras.utils.set_random_seed(4)
  inputs = keras.Input((3, 4))
  shared = keras.layers.Dense(5, activation="tanh")
  x1 = shared(inputs)  # Dense over a sequence axis
  x2 = shared(keras.layers.Dense(4)(x1[:, 0]))  # a second call of `shared`
  outputs = keras.layers.Dense(2)(keras.layers.Concatenate()(
      [keras.layers.Flatten()(x1), x2]))
  model = keras.Model(inputs, outputs)
  assert _all_closed_form(model)
  x = np.random.default_rng(4).normal(size=(6, 3, 4)).astype("float32")
  tolerances.assert_all_close(
      importance.mas(model, x, batch_size=4),
      _tf_per_sample_reference(model, x, _global_loss), rtol=1e-4)


@pytest.mark.parametrize("conv_kwargs", [
    {"padding": "valid"},
    {"padding": "same", "strides": 2},
    {"padding": "same", "dilation_rate": 2},
])
def test_conv2d_fast_path_matches_definition(conv_kwargs):
  keras.utils.set_random_seed(9)
  model = keras.Sequential([
      keras.Input((7, 7, 2)),
      keras.layers.Conv2D(3, 3, activation="relu", **conv_kwargs),
      keras.layers.Conv2D(2, (2, 3), use_bias=False),
      keras.layers.Flatten(),
      keras.layers.Dense(3),
  ])
  assert _all_closed_form(model)
  x = np.random.default_rng(9).normal(size=(5, 7, 7, 2)).astype("float32")
  tolerances.assert_all_close(
      importance.mas(model, x, batch_size=2),
      _tf_per_sample_reference(model, x, _global_loss), rtol=1e-4,
      atol=1e-5)


def test_output_fn_selects_outputs():
  model = _mlp()
  x = np.random.default_rng(5).normal(size=(5, 5)).astype("float32")

  def head_loss(m, xs):
    return tf.reduce_sum(tf.square(m(xs, training=False)[:, :2]))

  tolerances.assert_all_close(
      importance.mas(model, x, output_fn=lambda out: out[:, :2]),
      _tf_per_sample_reference(model, x, head_loss), rtol=1e-4)


def test_local_mas_is_hebbian_for_relu_dense():
  model = _mlp()
  x = np.random.default_rng(6).normal(size=(9, 5)).astype("float64")
  w1, b1, w2, b2 = [v.numpy().astype("float64") for v in model.weights]
  y1 = np.maximum(x @ w1 + b1, 0)
  y2 = y1 @ w2 + b2  # linear output layer: δ = 2·y as well
  expected = [
      2 * np.mean(np.abs(np.einsum("bi,bj->bij", x, y1)), axis=0),
      2 * np.mean(np.abs(y1), axis=0),
      2 * np.mean(np.abs(np.einsum("bi,bj->bij", y1, y2)), axis=0),
      2 * np.mean(np.abs(y2), axis=0),
  ]
  tolerances.assert_all_close(
      importance.local_mas(model, x.astype("float32"), batch_size=4),
      expected)


def test_local_mas_conv_and_batchnorm_match_layerwise_definition():
  keras.utils.set_random_seed(7)
  conv = keras.layers.Conv2D(2, 3, activation="relu")
  norm = keras.layers.BatchNormalization()
  model = keras.Sequential([keras.Input((5, 5, 1)), conv, norm,
                            keras.layers.Flatten()])
  x = np.random.default_rng(7).normal(size=(4, 5, 5, 1)).astype("float32")
  conv_in = x
  norm_in = conv(x).numpy()
  expected = []
  for layer, inputs in ((conv, conv_in), (norm, norm_in)):
    expected += _tf_per_sample_reference(
        layer, inputs,
        lambda l, a: tf.reduce_sum(tf.square(l(a, training=False))))
  tolerances.assert_all_close(importance.local_mas(model, x), expected,
                              rtol=1e-4)


def test_local_mas_embedding_is_its_rows_own_output():
  model = keras.Sequential([
      keras.Input((4,), dtype="int32"),
      keras.layers.Embedding(10, 3),
      keras.layers.Flatten(),
      keras.layers.Dense(2),
  ])
  ids = np.array([[1, 1, 2, 9], [0, 3, 3, 3]], "int32")
  table = model.layers[0].embeddings.numpy().astype("float64")
  expected = np.zeros_like(table)
  for sample in ids:  # ‖E[ids]‖²: 2·E[r] times the row's count, per sample.
    rows, counts = np.unique(sample, return_counts=True)
    expected[rows] += np.abs(2 * table[rows] * counts[:, None])
  tolerances.assert_close(importance.local_mas(model, ids)[0],
                          expected / len(ids))


@pytest.mark.parametrize("estimator", [importance.mas, importance.local_mas])
def test_importance_pass_changes_no_variable(estimator):
  keras.utils.set_random_seed(8)
  model = keras.Sequential([
      keras.Input((5,)),
      keras.layers.Dense(6, activation="relu"),
      keras.layers.BatchNormalization(),
      keras.layers.Dropout(0.5),
      keras.layers.Dense(3),
  ])
  model.compile("sgd", "mse")
  model.fit(np.ones((8, 5)), np.ones((8, 3)), verbose=0)  # non-trivial stats
  before = [v.numpy().copy() for v in model.variables]
  x = np.random.default_rng(8).normal(size=(12, 5)).astype("float32") * 5
  first = estimator(model, x)
  second = estimator(model, x)
  for b, v in zip(before, model.variables):
    np.testing.assert_array_equal(b, v.numpy())
  # Dropout is off.
  tolerances.assert_all_close(first, [s.numpy() for s in second])


def test_importance_is_zero_for_unconnected_variables():
  inputs = keras.Input((3,))
  out = keras.layers.Dense(2)(inputs)
  unused = keras.layers.Dense(2)
  unused.build((None, 3))
  model = keras.Model(inputs, out)
  model.unused = unused
  assert len(model.trainable_variables) == 4
  for estimator in (importance.mas, importance.local_mas):
    omega = estimator(model, np.ones((2, 3), "float32"))
    assert [o.shape for o in omega] == [
        v.shape for v in model.trainable_variables]
    assert np.all(omega[0].numpy() > 0)
    assert not np.any(omega[2].numpy()) and not np.any(omega[3].numpy())


def test_errors_name_the_argument():
  model = _mlp()
  with pytest.raises(ValueError, match="argument `model`.*unbuilt"):
    importance.mas(keras.Sequential([keras.layers.Dense(2)]), np.ones((2, 3)))
  with pytest.raises(ValueError, match="argument `data`.*empty"):
    importance.mas(model, tf.data.Dataset.from_tensor_slices(
        np.zeros((0, 5), "float32")).batch(2))
  with pytest.raises(ValueError, match="argument `data`.*shape"):
    importance.mas(model, np.ones((4, 9), "float32"))
  with pytest.raises(ValueError, match="argument `data`"):
    importance.mas(model, "not data")
  with pytest.raises(ValueError, match="argument `num_samples`"):
    importance.mas(model, np.ones((4, 5)), num_samples=0)
  with pytest.raises(ValueError, match="argument `per_sample`"):
    importance.mas(model, np.ones((4, 5)), per_sample="yes")


def test_fisher_names_labels_out_of_range():
  model = _mlp()  # three logits
  x = np.zeros((4, 5), "float32")
  with pytest.raises(ValueError, match=r"labels \[0, 1, 7\] with some out"):
    importance.fisher(model, (x, np.array([0, 1, 7, 1])))


def test_default_batch_holds_about_a_million_input_values():
  assert importance.default_batch_size(np.zeros((9, 784))) == 1024
  assert importance.default_batch_size(np.zeros((9, 32, 32, 3))) == 256
  assert importance.default_batch_size(np.zeros((9, 224, 224, 3))) == 32
  model = _mlp()
  x = np.random.default_rng(8).normal(size=(70, 5)).astype("float32")
  tolerances.assert_all_close(
      importance.mas(model, x),
      [t.numpy() for t in importance.mas(model, x, batch_size=7)])
  assert importance.default_batch_size(x, model) == 1024


def test_default_batch_of_a_language_model_is_bounded_by_its_logits():
  # Token ids are few input values; the logits, sequence × vocabulary per
  # sample, are many: 128 tokens × 8,192 → 16 samples (16M values).
  ids = keras.Input((None,), dtype="int32")
  logits = keras.layers.Dense(8192)(keras.layers.Embedding(10, 4)(ids))
  model = keras.Model(ids, logits)
  tokens = np.zeros((9, 128), "int32")
  assert importance.default_batch_size(tokens) == 1024
  assert importance.default_batch_size(tokens, model) == 16
  assert importance.default_batch_size(np.zeros((9, 1 << 16)), model) == 1


def test_one_trace_per_model_is_not_reported_as_retracing(caplog):
  # A comparison builds a model per run; TensorFlow warns of "retracing"
  # after five traces of one code object, which each model's first pass is.
  x = np.random.default_rng(9).normal(size=(16, 5)).astype("float32")
  with caplog.at_level("WARNING"):
    for _ in range(7):
      importance.mas(_mlp(), x)
  assert not [r for r in caplog.records if "retracing" in r.getMessage()]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
