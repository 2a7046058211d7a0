"""BatchNormalization statistics: measured against NumPy, and the policies."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mas import batch_statistics
import tolerances


def _net(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  hidden = keras.layers.BatchNormalization(name="bn_in")(inputs)
  hidden = keras.layers.Dense(5, activation="relu")(hidden)
  hidden = keras.layers.BatchNormalization(name="bn_hidden")(hidden)
  return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _data(shift, n=40, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(shift, 1.0 + shift, (n, 6))).astype("float32")


def _reference(model, x, batch_size):
  """Per layer, mean and variance of its inputs in training mode, by batch."""
  dense, bn_hidden = model.layers[2], model.layers[3]
  firsts, seconds = [[], []], [[], []]
  for start in range(0, len(x), batch_size):
    batch = x[start:start + batch_size]
    normed = (batch - batch.mean(0)) / np.sqrt(batch.var(0) + 1e-3)
    normed = normed * np.array(model.layers[1].gamma) + np.array(
        model.layers[1].beta)
    hidden = np.maximum(normed @ np.array(dense.kernel) +
                        np.array(dense.bias), 0)
    for k, values in enumerate((batch, hidden)):
      firsts[k].append(values.sum(0))
      seconds[k].append((values.astype("float64") ** 2).sum(0))
  del bn_hidden
  out = []
  for k in range(2):
    mean = np.sum(firsts[k], 0) / len(x)
    out.append((mean, np.sum(seconds[k], 0) / len(x) - mean ** 2))
  return out


def test_population_statistics_match_numpy_and_change_nothing():
  model = _net()
  x = _data(2.0, n=37)  # A short last batch counts for its size.
  before = [np.array(w) for w in model.weights]
  measured = batch_statistics.population_statistics(model, x, batch_size=8)
  for (mean, var), (ref_mean, ref_var) in zip(measured,
                                              _reference(model, x, 8)):
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-5)
  for w, b in zip(model.weights, before):
    np.testing.assert_array_equal(np.array(w), b)
  # The layers' momentum is back: training moves the statistics as before.
  assert [l.momentum for l in batch_statistics.batch_norm_layers(model)] == [
      0.99, 0.99]


def test_a_dataset_and_num_samples_read_the_same_samples():
  model = _net()
  x = _data(1.0, n=30)
  from_arrays = batch_statistics.population_statistics(model, x[:20],
                                                       batch_size=10)
  dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(30))).batch(10)
  from_dataset = batch_statistics.population_statistics(
      model, dataset, num_samples=20, batch_size=10)
  for a, b in zip(from_arrays, from_dataset):
    tolerances.assert_all_close(a, b)


def _fit_on(model, x):
  model.compile("sgd", "mse")
  model.fit(x, np.zeros((len(x), 3)), epochs=1, batch_size=8, verbose=0)


@pytest.mark.parametrize("policy", batch_statistics.POLICIES)
def test_policies_after_two_tasks(policy):
  model = _net()
  first, second = _data(0.0), _data(3.0, seed=1)
  statistics = batch_statistics.TaskStatistics(policy)
  statistics.before_task(model)
  _fit_on(model, first)
  trained = batch_statistics.read(model)
  statistics.after_task(model, first)
  after_first = batch_statistics.read(model)
  measured_first = batch_statistics.population_statistics(model, first)
  statistics.before_task(model)
  _fit_on(model, second)
  statistics.after_task(model, second)
  after_second = batch_statistics.read(model)
  measured_second = batch_statistics.population_statistics(model, second)
  input_mean = after_second[0][0]
  if policy == "keras":
    # Moving averages as training left them: far from either population.
    np.testing.assert_array_equal(after_first[0][0], trained[0][0])
    assert np.all(np.abs(input_mean - 3.0) > 1.0)
  elif policy == "recompute":
    tolerances.assert_close(input_mean, measured_second[0][0])
  elif policy == "first_task":
    np.testing.assert_allclose(input_mean, after_first[0][0], rtol=1e-6)
    tolerances.assert_close(after_first[0][0], measured_first[0][0])
  else:
    # The inputs' statistics do not depend on the weights: the mixture of
    # both tasks exactly (equal weights), the variance with the means' gap.
    tolerances.assert_close(
        input_mean, (first.mean(0) + second.mean(0)) / 2, rtol=1e-4)
    tolerances.assert_close(
        after_second[0][1], np.concatenate([first, second]).var(0),
        rtol=1e-3)


def test_a_bad_policy_is_named():
  with pytest.raises(ValueError, match="argument `batch_norm`.*'moving'"):
    batch_statistics.TaskStatistics("moving")
