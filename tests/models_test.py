"""MASModel: consolidation, the penalty in training, saving, bad input."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_mas  # pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import importance  # pylint: disable=g-import-not-at-top,wrong-import-position
import tolerances  # pylint: disable=g-import-not-at-top,wrong-import-position

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(32, 5)).astype("float32")
_Y = _RNG.integers(0, 3, size=32)


def _functional(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((5,))
  hidden = keras.layers.Dense(8, activation="relu")(inputs)
  return keras_mas.MASModel(inputs, keras.layers.Dense(3)(hidden))


class SubclassedNet(keras_mas.MASModel):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.hidden = keras.layers.Dense(8, activation="relu")
    self.out = keras.layers.Dense(3)

  def call(self, inputs):
    return self.out(self.hidden(inputs))


keras.saving.register_keras_serializable("keras_mas_test")(SubclassedNet)


class PlainNet(keras.Model):

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(3)

  def call(self, inputs):
    return self.dense(inputs)


keras.saving.register_keras_serializable("keras_mas_test")(PlainNet)


def _compile(model, optimizer="sgd"):
  model.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=["accuracy"])
  return model


def _state(model):
  return ([v.numpy().copy() for v in model.importances]
          + [v.numpy().copy() for v in model.anchors]
          + [model.strength, model.consolidated_tasks])


def _assert_state_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_state_is_created_at_build_and_starts_neutral():
  model = _functional()
  assert len(model.importances) == len(model.trainable_variables) == 4
  assert model.consolidated_tasks == 0 and model.strength == 1.0
  assert float(model.mas_penalty()) == 0.0
  assert not any(v.trainable for v in model.importances + model.anchors)


def test_consolidate_sets_importance_and_anchors():
  model = _functional()
  omega_new = model.consolidate(_X, strength=2.0)
  expected = importance.mas(model, _X)
  for omega, new, e in zip(model.importances, omega_new, expected):
    np.testing.assert_allclose(omega.numpy(), e.numpy(), rtol=1e-6)
    np.testing.assert_allclose(new.numpy(), e.numpy(), rtol=1e-6)
  for anchor, v in zip(model.anchors, model.trainable_variables):
    np.testing.assert_array_equal(anchor.numpy(), v.numpy())
  assert model.strength == 2.0 and model.consolidated_tasks == 1


def test_accumulate_sum_doubles_and_decay_is_a_convex_combination():
  model = _functional()
  first = [o.numpy() for o in model.consolidate(_X)]
  model.consolidate(_X)
  for omega, f in zip(model.importances, first):
    np.testing.assert_allclose(omega.numpy(), 2 * f, rtol=1e-6)
  other = _X[::-1] * 2
  new = [o.numpy() for o in model.consolidate(other, accumulate="decay",
                                              alpha=0.25)]
  for omega, f, n in zip(model.importances, first, new):
    tolerances.assert_close(omega.numpy(), 0.25 * 2 * f + 0.75 * n)


@pytest.mark.parametrize("normalize, statistic", [("mean", np.mean),
                                                  ("max", np.max)])
def test_normalized_importance_keeps_the_ratios_at_a_fixed_scale(
    normalize, statistic):
  model = _functional()
  raw = [e.numpy() for e in importance.mas(model, _X)]
  scale = statistic(np.concatenate([r.ravel() for r in raw]))
  model.consolidate(_X, normalize=normalize)
  # Data 3× larger: Ω grows, its normalized form does not.
  model.consolidate(_X * 3, normalize=normalize)
  larger = [e.numpy() for e in importance.mas(model, _X * 3)]
  larger_scale = statistic(np.concatenate([r.ravel() for r in larger]))
  assert larger_scale > 2 * scale
  for omega, r, big in zip(model.importances, raw, larger):
    tolerances.assert_close(omega.numpy(), r / scale + big / larger_scale)


def test_local_mas_consolidation():
  model = _functional()
  model.consolidate(_X, method="local_mas")
  for omega, e in zip(model.importances, importance.local_mas(model, _X)):
    np.testing.assert_allclose(omega.numpy(), e.numpy(), rtol=1e-6)


def test_one_train_step_equals_a_hand_written_gradient_tape_step():
  model = _compile(_functional(), keras.optimizers.SGD(0.1))
  model.fit(_X, _Y, epochs=1, batch_size=32, verbose=0, shuffle=False)
  model.consolidate(_X, strength=3.0)
  # Move away from the anchors so that the penalty has a gradient.
  for v in model.trainable_variables:
    v.assign(v + 0.05)
  reference = _functional()
  reference.set_weights(model.get_weights())
  variables = reference.trainable_variables
  omegas = [o.numpy() for o in model.importances]
  anchors = [a.numpy() for a in model.anchors]
  with tf.GradientTape() as tape:
    logits = reference(_X)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        _Y, logits)
    penalty = 3.0 * tf.add_n([
        tf.reduce_sum(o * tf.square(v - a))
        for v, o, a in zip(variables, omegas, anchors)])
    total = loss + penalty
  grads = tape.gradient(total, variables)
  expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]

  history = model.fit(_X, _Y, epochs=1, batch_size=32, verbose=0,
                      shuffle=False)
  tolerances.assert_all_close([v.numpy() for v in model.trainable_variables],
                              expected)
  tolerances.assert_close(history.history["mas_penalty"][0], float(penalty))
  tolerances.assert_close(history.history["loss"][0], float(total))
  tolerances.assert_close(history.history["task_loss"][0], float(loss))


def test_second_task_sees_the_penalty_after_a_traced_first_fit():
  def after_two_tasks(strength):
    model = _compile(_functional(), "adam")
    model.fit(_X, _Y, epochs=2, verbose=0)  # traces the train function
    history = model.fit(_X, _Y, epochs=1, verbose=0)
    assert history.history["mas_penalty"] == [0]
    model.consolidate(_X, strength=strength)
    history = model.fit(_X + 3, (_Y + 1) % 3, epochs=5, batch_size=4,
                        verbose=0)
    drift = sum(np.sum((v.numpy() - a.numpy()) ** 2) for v, a in zip(
        model.trainable_variables, model.anchors))
    return history.history["mas_penalty"], drift

  penalties, anchored_drift = after_two_tasks(50.0)
  assert max(penalties) > 0
  free_penalties, free_drift = after_two_tasks(0.0)
  assert max(free_penalties) == 0
  assert anchored_drift < 0.5 * free_drift


@pytest.mark.parametrize("make", ["functional", "sequential", "subclassed",
                                  "wrapped"])
def test_keras_round_trip_keeps_importance_anchors_and_penalty(make, tmp_path):
  if make == "functional":
    model = _functional()
  elif make == "sequential":
    model = keras_mas.MASModel.from_model(keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(3)]))
  elif make == "subclassed":
    model = SubclassedNet()
    model(_X[:1])
  else:
    plain = PlainNet()
    plain(_X[:1])
    model = keras_mas.MASModel.from_model(plain)
  _compile(model, "adam").fit(_X, _Y, epochs=1, verbose=0)
  model.consolidate(_X, strength=4.0)
  model.penalty_mode = "proximal"
  _compile(model, "adam").fit(_X + 1, _Y, epochs=2, verbose=0)
  penalty = float(model.mas_penalty())
  assert penalty > 0
  path = str(tmp_path / "model.keras")
  model.save(path)
  restored = keras.models.load_model(path, safe_mode=True)
  assert isinstance(restored, keras_mas.MASModel)
  _assert_state_equal(_state(restored), _state(model))
  np.testing.assert_allclose(float(restored.mas_penalty()), penalty, rtol=1e-6)
  assert restored.penalty_mode == "proximal"
  np.testing.assert_allclose(restored.predict(_X, verbose=0),
                             model.predict(_X, verbose=0), rtol=1e-6)


def test_from_model_shares_weights_with_the_original():
  base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
  model = _compile(keras_mas.MASModel.from_model(base))
  model.fit(_X, _Y, epochs=1, verbose=0)
  np.testing.assert_array_equal(base.predict(_X, verbose=0),
                                model.predict(_X, verbose=0))
  assert keras_mas.MASModel.from_model(model) is model
  with pytest.raises(ValueError, match="argument `model`"):
    keras_mas.MASModel.from_model("model")


def test_subclassed_model_built_by_fit():
  model = _compile(SubclassedNet())
  history = model.fit(_X, _Y, epochs=1, verbose=0)
  assert "mas_penalty" in history.history
  model.consolidate(_X, strength=10.0)
  assert model.consolidated_tasks == 1
  # The train function traced by the first fit must see the new state.
  history = model.fit(_X + 2, _Y, epochs=2, batch_size=8, verbose=0)
  assert history.history["mas_penalty"][-1] > 0


def test_fit_features_keep_working():
  model = _compile(_functional(), "adam")
  model.consolidate(_X)
  stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1)
  history = model.fit(
      _X, _Y, sample_weight=np.linspace(0, 1, 32), validation_data=(_X, _Y),
      epochs=3, verbose=0, callbacks=[stopper])
  for key in ("loss", "mas_penalty", "task_loss", "accuracy", "val_loss",
              "val_accuracy", "val_mas_penalty"):
    assert key in history.history
  loss, accuracy = model.evaluate(_X, _Y, verbose=0)[:2]
  assert np.isfinite(loss) and 0 <= accuracy <= 1
  assert model.predict(_X, verbose=0).shape == (32, 3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_and_importance_stay_finite(policy):
  keras.mixed_precision.set_global_policy(policy)
  try:
    model = _compile(_functional(), "adam")
    if policy == "mixed_float16":
      assert isinstance(model.optimizer,
                        keras.optimizers.LossScaleOptimizer)
    model.fit(_X, _Y, epochs=1, verbose=0)
    model.consolidate(_X, strength=10.0)
    history = model.fit(_X + 1, _Y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["mas_penalty"][-1] > 0
    assert all(np.all(np.isfinite(o.numpy())) for o in model.importances)
    for method in ("mas", "local_mas"):
      omega = model.consolidate(_X, method=method)
      assert all(np.all(np.isfinite(o.numpy())) for o in omega)
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kwargs, argument", [
    ({"strength": -1.0}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"strength": float("inf")}, "strength"),
    ({"method": "ewc2"}, "method"),
    ({"accumulate": "max"}, "accumulate"),
    ({"alpha": 1.5}, "alpha"),
    ({"num_samples": -3}, "num_samples"),
    ({"normalize": "median"}, "normalize"),
])
def test_bad_consolidate_arguments_leave_the_state_unchanged(kwargs, argument):
  model = _functional()
  model.consolidate(_X, strength=2.0)
  before = _state(model)
  with pytest.raises(ValueError, match=f"argument `{argument}`"):
    model.consolidate(_X, **kwargs)
  _assert_state_equal(_state(model), before)


def test_bad_data_leaves_the_state_unchanged():
  model = _functional()
  model.consolidate(_X, strength=2.0)
  before = _state(model)
  with pytest.raises(ValueError, match="argument `data`.*empty"):
    model.consolidate(np.zeros((0, 5), "float32"))
  with pytest.raises(ValueError, match="argument `data`.*shape"):
    model.consolidate(np.ones((4, 7), "float32"))
  with pytest.raises(ValueError, match="not finite"):
    model.consolidate(np.full((4, 5), 1e30, "float32"))
  _assert_state_equal(_state(model), before)
  with pytest.raises(ValueError, match="argument `strength`"):
    model.strength = -2
  assert model.strength == 2.0


def _diverging(strength=1e6):
  """A model whose second task diverges in gradient mode at this λ."""
  model = _compile(_functional(), keras.optimizers.SGD(0.1, momentum=0.9))
  model.fit(_X, _Y, epochs=1, verbose=0)
  model.consolidate(_X, strength=strength)
  return model


def test_fit_stops_on_divergence_by_default_with_weights_restored():
  model = _diverging()
  anchors = [a.numpy() for a in model.anchors]
  with pytest.raises(keras_mas.callbacks.TrainingDivergedError,
                     match=r"λ=1e\+06.*stable for λ < [0-9.e+-]+"):
    model.fit(_X, -_Y + 2, batch_size=2, epochs=2, verbose=0)
  for v, a in zip(model.trainable_variables, anchors):
    np.testing.assert_array_equal(v.numpy(), a)  # Start of the failed epoch.


def test_a_guard_passed_by_the_caller_is_not_doubled(monkeypatch):
  began = []
  original = keras_mas.callbacks.DivergenceGuard.on_epoch_begin

  def on_epoch_begin(self, epoch, logs=None):
    began.append(self)
    original(self, epoch, logs)

  monkeypatch.setattr(keras_mas.callbacks.DivergenceGuard, "on_epoch_begin",
                      on_epoch_begin)
  model = _compile(_functional())
  guard = keras_mas.callbacks.DivergenceGuard()
  model.fit(_X, _Y, epochs=2, verbose=0, callbacks=[guard])
  assert began == [guard, guard]
  began.clear()
  model.fit(_X, _Y, epochs=1, verbose=0)  # Its own, one.
  assert len(began) == 1 and began[0] is not guard
  began.clear()
  model.stop_on_divergence = False
  model.fit(_X, _Y, epochs=1, verbose=0)
  assert not began


def test_opting_out_trains_on_through_divergence():
  model = _diverging()
  model.stop_on_divergence = False
  history = model.fit(_X, -_Y + 2, batch_size=2, epochs=2, verbose=0)
  assert not np.isfinite(history.history["loss"][-1])


def test_consolidate_on_diverged_weights_blames_the_weights():
  model = _diverging()
  model.stop_on_divergence = False
  model.fit(_X, -_Y + 2, batch_size=2, epochs=2, verbose=0)
  before = _state(model)
  with pytest.raises(ValueError, match=r"weights \[.*\] are not finite"):
    model.consolidate(_X)
  _assert_state_equal(_state(model), before)


@pytest.mark.parametrize("bad", [None, 0, "yes"])
def test_invalid_stop_on_divergence_is_named(bad):
  model = _functional()
  with pytest.raises(ValueError, match="argument `stop_on_divergence`"):
    model.stop_on_divergence = bad
  assert model.stop_on_divergence is True


def test_penalty_log_interval_changes_the_logs_not_the_training():
  runs = {}
  for interval in (1, 1000):
    model = _compile(_functional())
    model.fit(_X, _Y, epochs=1, verbose=0)
    model.consolidate(_X, strength=3.0)
    model.penalty_log_interval = interval
    at_epoch_start, logs = [], []
    for _ in range(3):
      at_epoch_start.append(float(model.mas_penalty()))
      logs.append(model.fit(_X, (_Y + 1) % 3, batch_size=4, epochs=1,
                            shuffle=False, verbose=0).history)
    runs[interval] = model, at_epoch_start, logs
  exact, sampled = runs[1], runs[1000]
  for a, b in zip(exact[0].get_weights(), sampled[0].get_weights()):
    np.testing.assert_array_equal(a, b)
  for e, s, start in zip(exact[2], sampled[2], sampled[1]):
    assert e["task_loss"] == s["task_loss"]
    # Only each epoch's first step is measured (the iteration count never
    # reaches a multiple of 1000 here); the others' loss adds that value.
    tolerances.assert_close(s["mas_penalty"][0], start)
    tolerances.assert_close(s["loss"][0],
                            s["task_loss"][0] + s["mas_penalty"][0])
    assert e["mas_penalty"][0] > start  # The exact mean grows in the epoch.


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_invalid_penalty_log_interval_is_named(bad):
  model = _functional()
  with pytest.raises(ValueError, match="argument `penalty_log_interval`"):
    model.penalty_log_interval = bad
  assert model.penalty_log_interval == 1


def test_unbuilt_model_is_refused():
  model = SubclassedNet()
  with pytest.raises(ValueError, match="argument `model`.*unbuilt"):
    model.consolidate(_X)


def test_subclass_built_from_inputs_and_outputs_is_refused():
  inputs = keras.Input((5,))
  with pytest.raises(TypeError, match="FunctionalMASModel"):
    SubclassedNet(inputs, keras.layers.Dense(2)(inputs))


def _digits_two_tasks():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.data / 16).astype("float32")
  y = digits.target
  a, b = y < 5, y >= 5  # domain-incremental: both tasks use outputs 0..4
  return (x[a], y[a]), (x[b], y[b] - 5)


def _accuracy_on_a_after_b(strength):
  (xa, ya), (xb, yb) = _digits_two_tasks()
  keras.utils.set_random_seed(0)
  inputs = keras.Input((64,))
  hidden = keras.layers.Dense(64, activation="relu")(inputs)
  hidden = keras.layers.Dense(64, activation="relu")(hidden)
  model = keras_mas.MASModel(inputs, keras.layers.Dense(5)(hidden))
  _compile(model, keras.optimizers.Adam(3e-3))
  model.fit(xa[:600], ya[:600], epochs=10, verbose=0)
  if strength:
    model.consolidate(xa[:600], strength=strength)
  _compile(model, keras.optimizers.Adam(3e-3))  # fresh optimizer state
  model.fit(xb[:600], yb[:600], epochs=10, verbose=0)
  return (model.evaluate(xa[600:], ya[600:], verbose=0)[1],
          model.evaluate(xb[600:], yb[600:], verbose=0)[1])


def test_mas_keeps_task_a_much_better_than_fine_tuning():
  finetune_a, finetune_b = _accuracy_on_a_after_b(0.0)
  mas_a, mas_b = _accuracy_on_a_after_b(0.1)
  assert mas_a > finetune_a + 0.15, (mas_a, finetune_a)
  assert mas_b > 0.8  # still learns task B


def test_under_a_strategy_fit_starts_no_extra_iteration_of_the_data():
  # Keras draws a batch to build under a strategy; a reshuffling dataset
  # would then train on other orders than on one device.
  started = []

  def samples():
    started.append(1)
    for i in range(8):
      yield np.full((3,), i, "float32"), np.int64(i % 2)

  dataset = tf.data.Dataset.from_generator(samples, output_signature=(
      tf.TensorSpec((3,), tf.float32), tf.TensorSpec((), tf.int64))).batch(4)
  with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
    model = keras_mas.MASModel.from_model(keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2)]))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
  model.fit(dataset, epochs=2, verbose=0)
  assert len(started) == 2  # one iteration per epoch, none to build


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


def _two_tasks_with_fresh_optimizers(reset, optimizer):
  """Task A, consolidate, task B: a fresh optimizer by `reset` or compile."""
  model = _compile(_functional(), keras.optimizers.get(optimizer))
  model.fit(_X, _Y, epochs=2, batch_size=8, shuffle=False, verbose=0)
  model.consolidate(_X, strength=0.5)
  traced = model.train_function
  if reset:
    model.reset_optimizer()
  else:
    _compile(model, keras.optimizers.get(optimizer))
  model.fit(_X, 2 - _Y, epochs=2, batch_size=8, shuffle=False, verbose=0)
  return model, traced


@pytest.mark.parametrize("optimizer", [
    "adam", {"class_name": "sgd", "config": {"momentum": 0.9}},
    {"class_name": "adagrad", "config": {"initial_accumulator_value": 0.3}}])
def test_reset_optimizer_trains_as_a_fresh_compile_without_a_retrace(
    optimizer):
  reset, traced = _two_tasks_with_fresh_optimizers(True, optimizer)
  compiled, _ = _two_tasks_with_fresh_optimizers(False, optimizer)
  assert reset.train_function is traced  # Not traced again.
  for a, b in zip(reset.get_weights(), compiled.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(reset.optimizer.iterations) == int(
      compiled.optimizer.iterations) == 8


def test_reset_optimizer_restores_what_a_new_optimizer_starts_from():
  model = _compile(_functional(), keras.optimizers.Adagrad(
      0.05, initial_accumulator_value=0.3))
  model.fit(_X, _Y, epochs=1, verbose=0)
  model.reset_optimizer()
  assert int(model.optimizer.iterations) == 0
  assert float(model.optimizer.learning_rate) == pytest.approx(0.05)
  accumulators = [v for v in model.optimizer.variables
                  if "accumulator" in v.path]
  assert accumulators
  for v in accumulators:
    np.testing.assert_allclose(v.numpy(), 0.3)


def test_reset_optimizer_refuses_an_uncompiled_or_changed_model():
  model = _functional()
  with pytest.raises(ValueError, match="Expected a compiled model"):
    model.reset_optimizer()
  _compile(model).fit(_X, _Y, epochs=1, verbose=0)
  model.layers[1].trainable = False
  with pytest.raises(ValueError, match="compile it again"):
    model.reset_optimizer()


class _FixedBuffer:
  """Appends two fixed samples to every batch; records what `update` saw."""

  def __init__(self):
    self.x = tf.constant(_X[:2])
    self.y = tf.constant(_Y[:2])
    self.seen = tf.Variable([0, 0])

  def join(self, x, y, sample_weight):
    assert sample_weight is None
    return (tf.concat([x, self.x], 0), tf.concat([y, self.y], 0), None)

  def update(self, x, y, y_pred, incoming):
    self.seen.assign([tf.shape(x)[0], incoming])


def test_rehearsal_trains_on_the_joined_batch_and_scores_the_incoming():
  keras.utils.set_random_seed(0)
  model = _compile(_functional())
  buffer = _FixedBuffer()
  model.rehearsal = buffer
  before = model(_X[8:16])
  history = model.fit(_X[8:16], _Y[8:16], batch_size=8, epochs=1, verbose=0)
  assert buffer.seen.numpy().tolist() == [10, 8]
  # Accuracy before the step, on the 8 incoming samples alone.
  expected = np.mean(np.argmax(before, -1) == _Y[8:16])
  assert history.history["accuracy"][0] == pytest.approx(expected)
  # The step saw the buffer: the same step on the incoming batch alone
  # lands elsewhere.
  alone = _compile(_functional())
  alone.fit(_X[8:16], _Y[8:16], batch_size=8, epochs=1, verbose=0)
  assert not np.allclose(model.trainable_variables[0].numpy(),
                         alone.trainable_variables[0].numpy())
  model.rehearsal = None
  joined = _compile(_functional())
  joined.fit(np.concatenate([_X[8:16], _X[:2]]),
             np.concatenate([_Y[8:16], _Y[:2]]), batch_size=10, epochs=1,
             verbose=0)
  for a, b in zip(model.trainable_variables, joined.trainable_variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_invalid_rehearsal_is_named():
  model = _functional()
  with pytest.raises(ValueError, match="argument `rehearsal`"):
    model.rehearsal = object()
  assert model.rehearsal is None


def test_mas_state_survives_keras_backup_and_restore(tmp_path):
  # Plain `fit` users' preemption answer: Keras's BackupAndRestore brings
  # back Ω, θ*, λ and the task count with the weights.
  rng = np.random.default_rng(0)
  x, y = rng.random((64, 6)).astype("float32"), rng.integers(0, 3, 64)

  def make():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    net = keras_mas.MASModel(inputs, keras.layers.Dense(3)(inputs))
    net.compile("adam",
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net

  class Interrupt(keras.callbacks.Callback):

    def on_epoch_end(self, epoch, logs=None):
      if epoch == 1:
        raise RuntimeError("preempted")

  backup = str(tmp_path / "backup")
  first = make()
  first.fit(x, y, epochs=1, verbose=0)
  first.consolidate(x, strength=0.7)
  with pytest.raises(RuntimeError, match="preempted"):
    first.fit(x, y, epochs=4, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(backup), Interrupt()])
  state = [np.array(v) for v in first.importances + first.anchors]
  second = make()  # A new process would start from scratch like this.
  assert second.consolidated_tasks == 0
  history = second.fit(x, y, epochs=4, verbose=0, callbacks=[
      keras.callbacks.BackupAndRestore(backup)])
  assert len(history.epoch) == 2  # Epochs 2 and 3: it continued.
  assert second.strength == pytest.approx(0.7)
  assert second.consolidated_tasks == 1
  for got, want in zip(second.importances + second.anchors, state):
    np.testing.assert_array_equal(np.array(got), want)
