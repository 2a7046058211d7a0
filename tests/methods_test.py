"""The baselines: each against a hand-computed case, and each shown to act."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_mas
from keras_mas import heads
from keras_mas import importance
from keras_mas import methods
from keras_mas import tasks
from keras_mas import training
import tolerances

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(10, 4)).astype("float32")
_Y = _RNG.integers(0, 3, size=10)


def _linear(seed=0, scale=1.0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((4,))
  model = keras_mas.MASModel(inputs, keras.layers.Dense(3)(inputs))
  kernel, bias = model.layers[-1].kernel, model.layers[-1].bias
  kernel.assign(kernel * scale)
  bias.assign(tf.constant([0.1, -0.2, 0.05]) * scale)
  return model


def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _numpy_fisher(model, x, y):
  w, b = [v.numpy().astype("float64") for v in model.trainable_variables]
  x = x.astype("float64")
  delta = np.eye(3)[y] - _softmax(x @ w + b)  # ∂ log p(y|x) / ∂ logits
  return [np.mean(np.einsum("bi,bj->bij", x, delta) ** 2, axis=0),
          np.mean(delta ** 2, axis=0)]


def test_empirical_fisher_matches_numpy():
  model = _linear()
  expected = _numpy_fisher(model, _X, _Y)
  for data in ((_X, _Y), tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(4)):
    for got, want in zip(importance.fisher(model, data), expected):
      tolerances.assert_close(got, want)


def test_fisher_vectorized_path_matches_numpy_formula():
  keras.utils.set_random_seed(1)
  inputs = keras.Input((4,))
  hidden = keras.layers.LayerNormalization()(inputs)  # not analytic
  model = keras_mas.MASModel(inputs, keras.layers.Dense(3)(hidden))
  variables = model.trainable_variables
  totals = [np.zeros(v.shape) for v in variables]
  for k in range(len(_X)):
    with tf.GradientTape() as tape:
      logp = -keras.losses.sparse_categorical_crossentropy(
          _Y[k:k + 1], model(_X[k:k + 1]), from_logits=True)
    for t, g in zip(totals, tape.gradient(logp, variables)):
      t += g.numpy() ** 2
  for got, want in zip(importance.fisher(model, (_X, _Y), batch_size=4),
                       [t / len(_X) for t in totals]):
    # A loop of single samples against batches of four: sums taken apart.
    tolerances.assert_close(got, want, rtol=1e-4)


def test_true_fisher_samples_from_the_model():
  # E_{y~p}[(x ⊗ (e_y − p))²] = Σ_c p_c (x ⊗ (e_c − p))², estimated from
  # many draws per input.
  model = _linear()
  w, b = [v.numpy().astype("float64") for v in model.trainable_variables]
  p = _softmax(_X.astype("float64") @ w + b)
  expected_kernel = np.zeros((4, 3))
  for c in range(3):
    delta = np.eye(3)[c] - p
    expected_kernel += np.mean(
        p[:, c, None, None] * np.einsum("bi,bj->bij", _X, delta) ** 2, axis=0)
  repeated = np.repeat(_X, 600, axis=0)
  kernel = importance.fisher(model, repeated, empirical=False,
                             batch_size=500)[0].numpy()
  np.testing.assert_allclose(kernel, expected_kernel, rtol=0.15, atol=1e-4)
  with pytest.raises(ValueError, match="argument `data`.*labels"):
    importance.fisher(model, _X)


def test_l2_importance_is_one():
  model = _linear()
  assert all(np.all(o.numpy() == 1) for o in importance.uniform(model))


def test_si_path_integral_on_a_two_step_toy_problem():
  # One weight w, loss (w·x − y)² on a single sample, plain SGD: two steps.
  inputs = keras.Input((1,))
  model = keras_mas.MASModel(
      inputs, keras.layers.Dense(1, use_bias=False,
                                 kernel_initializer="zeros")(inputs))
  model.compile(keras.optimizers.SGD(0.1), "mse")
  model.track_path_integral()
  x, y = np.array([[2.0]], "float32"), np.array([[1.0]], "float32")
  w, omega = 0.0, 0.0
  for _ in range(2):
    g = 2 * (w * 2.0 - 1.0) * 2.0
    step = -0.1 * g
    omega += -g * step
    w += step
  model.fit(x, y, epochs=2, batch_size=1, verbose=0)
  tolerances.assert_close(model.layers[-1].kernel.numpy()[0, 0], w)
  tolerances.assert_close(model._si_path.integrals[0].numpy()[0, 0], omega)
  new = model.consolidate(None, method="path_integral", damping=0.1)
  tolerances.assert_close(new[0].numpy()[0, 0], omega / (w ** 2 + 0.1))
  # The path restarts with the task: ω = 0, start = θ.
  assert model._si_path.integrals[0].numpy()[0, 0] == 0.0
  tolerances.assert_close(model._si_path.starts[0].numpy()[0, 0], w)


def test_si_state_survives_a_keras_round_trip(tmp_path):
  model = _linear()
  model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True))
  model.track_path_integral()
  model.fit(_X, _Y, epochs=1, verbose=0)
  path = str(tmp_path / "si.keras")
  model.save(path)
  restored = keras.models.load_model(path)
  assert restored._si_path is not None
  for a, b in zip(restored._si_path.integrals, model._si_path.integrals):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_lwf_distillation_target_and_loss():
  sequence = tasks.make_sequence("digits", "split", "task", 2)
  model = keras_mas.MASModel.from_model(keras.Sequential([
      keras.Input(sequence.input_shape), keras.layers.Flatten(),
      keras.layers.Dense(sequence.num_outputs)]))
  x, y, loss, _ = methods.training_data(methods.get("lwf"), model, sequence,
                                        1, 32, temperature=2.0)
  task = sequence.tasks[1]
  np.testing.assert_array_equal(y[:, 0], task.y_train)
  tolerances.assert_close(
      y[:, 1:], model.predict(x, verbose=0)[:, 0:sequence.tasks[0].stop])
  # The loss: task cross-entropy + T²·KL(old ‖ new) over the old outputs.
  logits = _RNG.normal(size=(len(y[:5]), sequence.num_outputs))
  t = 2.0
  old = _softmax(y[:5, 1:].astype("float64") / t)
  new = _softmax(logits[:, :sequence.tasks[0].stop] / t)
  task_ce = -np.log(_softmax(logits[:, task.start:task.stop])[
      np.arange(5), task.y_train[:5]])
  kl = np.sum(old * (np.log(old) - np.log(new)), axis=1)
  tolerances.assert_close(
      float(loss(y[:5], logits.astype("float32"))),
      np.mean(task_ce + t * t * kl), rtol=1e-4)


def test_joint_training_sees_every_task_so_far():
  sequence = tasks.make_sequence("digits", "split", "task", 3)
  x, y, loss, _ = methods.training_data(methods.get("joint"), None, sequence,
                                        2, 32)
  assert len(x) == sum(len(t.x_train) for t in sequence.tasks)
  assert isinstance(loss, heads.MixedTaskLoss)
  for t in sequence.tasks:
    rows = (y[:, 1] == t.start) & (y[:, 2] == t.stop)
    assert rows.sum() == len(t.x_train)
    np.testing.assert_array_equal(y[rows, 0] - t.start, t.y_train)
  # Class-incremental: every sample competes with all the classes seen.
  class_il = tasks.make_sequence("digits", "split", "class", 3)
  _, y_class, _, _ = methods.training_data(methods.get("joint"), None,
                                           class_il, 2, 32)
  assert set(y_class[:, 1]) == {0} and set(y_class[:, 2]) == {
      class_il.tasks[2].stop}
  # Masked logits: only the sample's own head counts.
  logits = np.zeros((1, sequence.num_outputs), "float32")
  logits[0, 0] = 50.0  # outside the head of task 1
  value = float(loss(np.array([[3, 3, 6]]), logits))
  tolerances.assert_close(value, np.log(3.0))


def _streaming(sequence):
  return tasks.from_datasets(
      [(t.dataset("train"), t.dataset("test")) for t in sequence.tasks],
      num_classes=[t.num_classes for t in sequence.tasks],
      scenario=sequence.scenario)


def _batches(dataset):
  parts = list(dataset.as_numpy_iterator())
  return (np.concatenate([x for x, _ in parts]),
          np.concatenate([y for _, y in parts]))


def test_streaming_lwf_targets_come_from_the_frozen_copy_batch_by_batch():
  sequence = tasks.make_sequence("digits", "split", "task", 2)
  model = keras_mas.MASModel.from_model(keras.Sequential([
      keras.Input(sequence.input_shape), keras.layers.Flatten(),
      keras.layers.Dense(sequence.num_outputs)]))
  lwf = methods.get("lwf")
  task = sequence.tasks[1]
  # Given a frozen copy, or making its own (a copy of the model now).
  for frozen in (model, None):
    dataset, y, loss, _ = methods.training_data(
        lwf, model, _streaming(sequence), 1, 32, frozen=frozen)
    assert y is None
    x, targets = _batches(dataset)
    assert targets.shape == (len(task.x_train), 1 + sequence.tasks[0].stop)
    np.testing.assert_array_equal(np.sort(targets[:, 0]),
                                  np.sort(task.y_train))
    tolerances.assert_close(
        targets[:, 1:],
        model.predict(x, verbose=0)[:, :sequence.tasks[0].stop])
  _, _, array_loss, _ = methods.training_data(lwf, model, sequence, 1, 32)
  assert loss.get_config() == array_loss.get_config()


def test_streaming_joint_samples_every_task_once_per_epoch():
  sequence = tasks.make_sequence("digits", "split", "task", 3)
  dataset, y, loss, _ = methods.training_data(
      methods.get("joint"), None, _streaming(sequence), 2, 32)
  assert y is None and isinstance(loss, heads.MixedTaskLoss)
  first, second = _batches(dataset)[1], _batches(dataset)[1]
  for t in sequence.tasks:
    rows = (first[:, 1] == t.start) & (first[:, 2] == t.stop)
    assert rows.sum() == len(t.x_train)
    np.testing.assert_array_equal(np.sort(first[rows, 0] - t.start),
                                  np.sort(t.y_train))
  # Tasks are mixed, and reshuffled every epoch.
  assert len(set(first[:32, 1])) > 1
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(np.sort(first, axis=0),
                                np.sort(second, axis=0))


@pytest.mark.parametrize("method", ["mas", "ewc"])
def test_streaming_importance_equals_importance_on_arrays(method):
  sequence = tasks.make_sequence("digits", "split", "task", 2)
  keras.utils.set_random_seed(0)
  model = keras_mas.MASModel.from_model(keras.Sequential([
      keras.Input(sequence.input_shape), keras.layers.Flatten(),
      keras.layers.Dense(8, activation="relu"),
      keras.layers.Dense(sequence.num_outputs)]))
  recipe = methods.get(method)
  streaming = _streaming(sequence)
  estimator = {"mas": importance.mas, "ewc": importance.fisher}[method]
  for task, streamed in zip(sequence.tasks, streaming.tasks):
    options = recipe.consolidation(task, 1.0, 0.5, None)
    options = {"output_fn": options["output_fn"],
               **({"empirical": True} if method == "ewc" else {})}
    from_arrays = estimator(model, recipe.consolidation_data(task), **options)
    from_pipeline = estimator(
        model, recipe.consolidation_data(streamed, streaming.input_shape),
        **options)
    for a, b in zip(from_arrays, from_pipeline):
      tolerances.assert_close(b, a)
    first = estimator(model, recipe.consolidation_data(
        streamed, streaming.input_shape), num_samples=50, **options)
    expected = estimator(model, tuple(
        a[:50] for a in recipe.consolidation_data(task)) if method == "ewc"
                         else task.x_train[:50], **options)
    tolerances.assert_close(first[0], expected[0])


def _final_weights(workdir):
  model = keras.models.load_model(os.path.join(
      workdir, "checkpoints", "task_1", "model.keras"))
  return [v.numpy() for v in model.trainable_variables]


@pytest.fixture(scope="module")
def two_tasks():
  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:64], task.y_train[:64]
    task.x_test, task.y_test = task.x_test[:16], task.y_test[:16]
  return sequence


@pytest.fixture(scope="module")
def finetuned(two_tasks, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finetune"))
  training.run_sequence(two_tasks, workdir, method="finetune", epochs=2,
                        hidden_units=16, verbose=0)
  return _final_weights(workdir)


@pytest.mark.parametrize("method", sorted(set(training.METHODS) -
                                          {"finetune"}))
def test_every_method_changes_training_compared_with_fine_tuning(
    method, two_tasks, finetuned, tmp_path):
  training.run_sequence(two_tasks, str(tmp_path), method=method, epochs=2,
                        strength=100.0, hidden_units=16, verbose=0)
  weights = _final_weights(str(tmp_path))
  difference = max(np.max(np.abs(a - b)) for a, b in zip(weights, finetuned))
  # Training is deterministic: any difference is the method acting (a method
  # that silently does nothing gives bit-identical weights).
  assert difference > 1e-5, method


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match="argument `method`"):
    methods.get("imm")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
