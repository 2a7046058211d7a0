"""keras_mas on Keras's JAX and PyTorch backends, against TensorFlow's results.

Keras fixes its backend at import, so each test runs a small script in
another process with `KERAS_BACKEND=jax` or `torch` (and, to compare, the
same script with `KERAS_BACKEND=tensorflow`): a worker kept for the next
script (`backend_processes`), or a new process where a test needs it. The
scripts print one JSON line, the last of their output. A backend's tests skip where it is not installed
(`pip install -e .[jax]`, `.[torch]`).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import backend_processes
import numpy as np
import pytest
import tolerances

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed(backend, module):
  return pytest.param(backend, marks=pytest.mark.skipif(
      importlib.util.find_spec(module) is None,
      reason=f"{module} is not installed: pip install -e .[{backend}]"))


_JAX = _installed("jax", "jax")
_TORCH = _installed("torch", "torch")


@pytest.fixture(params=[_JAX, _TORCH])
def backend(request):
  """Each backend other than TensorFlow, where it is installed."""
  return request.param


@pytest.fixture(params=[_JAX])
def jax_backend(request):
  return request.param


@pytest.fixture(params=[_TORCH])
def torch_backend(request):
  return request.param

# Shared by the scripts: a two-layer MLP whose trainable weights are drawn by
# NumPy, so that both backends start from the same values.
_PRELUDE = """
import json, os, sys
import numpy as np
import keras
import keras_mas
assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
assert os.path.dirname(keras_mas.__file__).startswith(os.getcwd())

def set_weights(model, seed=0, scale=0.4):
  rng = np.random.default_rng(seed)
  for v in model.trainable_variables:
    v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))

def mlp(cls=keras.Model, inputs=5, hidden=7, outputs=3, seed=0):
  x = keras.Input((inputs,))
  h = keras.layers.Dense(hidden, activation="relu")(x)
  model = cls(x, keras.layers.Dense(outputs)(h))
  set_weights(model, seed)
  return model

def numpy(tensor):
  return np.asarray(keras.ops.convert_to_numpy(tensor))

def arrays(result):
  return [np.asarray(keras.ops.convert_to_numpy(t)).tolist() for t in result]

def emit(value):
  print(json.dumps(value))
"""


def _run(code, backend, timeout=300, **extra_env):
  return backend_processes.run(_PRELUDE + textwrap.dedent(code), backend,
                               timeout, **extra_env)


def _close(actual, expected, rtol=tolerances.RTOL):
  """`tolerances.assert_all_close` on lists of arrays, or on one value."""
  if not isinstance(actual, list):
    actual, expected = [actual], [expected]
  tolerances.assert_all_close(actual, expected, rtol=rtol)


def _mlp_references(w1, b1, w2, b2, x, y):
  """Per-sample gradients of the 2-layer MLP, by hand, in float64."""
  w1, b1, w2, b2, x = (np.asarray(a, "float64") for a in (w1, b1, w2, b2, x))
  z1 = x @ w1 + b1
  h = np.maximum(z1, 0)
  out = h @ w2 + b2

  def through(d_out, d_h):
    d_z1 = d_h * (z1 > 0)
    return [np.einsum("bi,bj->bij", x, d_z1), d_z1,
            np.einsum("bi,bj->bij", h, d_out), d_out]

  global_mas = through(2 * out, (2 * out) @ w2.T)
  # Local MAS: each layer's own output norm, its input fixed.
  local = through(2 * out, 2 * h)
  p = np.exp(out - out.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  d_log_p = np.eye(out.shape[1])[y] - p
  fisher = through(d_log_p, d_log_p @ w2.T)
  return {
      "mas": [np.abs(g).mean(axis=0) for g in global_mas],
      "mas_batched": [sum(np.abs(g[s:s + 4].sum(axis=0))
                          for s in range(0, len(x), 4)) / len(x)
                      for g in global_mas],
      "local_mas": [np.abs(g).mean(axis=0) for g in local],
      "fisher": [np.square(g).mean(axis=0) for g in fisher],
  }


def test_importance_matches_the_per_sample_reference(backend):
  result = _run(backend=backend, code="""
      import tensorflow as tf
      from keras_mas import importance
      model = mlp()
      x = np.random.default_rng(1).normal(size=(10, 5)).astype("float32")
      y = np.arange(10) % 3
      dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
      emit({
          "weights": arrays(model.trainable_variables), "x": x.tolist(),
          "mas": arrays(importance.mas(model, dataset)),  # 4 + 4 + 2
          "mas_array": arrays(importance.mas(model, x, batch_size=3)),
          "mas_batched": arrays(importance.mas(model, x, per_sample=False,
                                               batch_size=4)),
          "local_mas": arrays(importance.local_mas(model, x, batch_size=4)),
          "fisher": arrays(importance.fisher(model, dataset)),
          "num_samples": arrays(importance.mas(model, x, num_samples=6,
                                               batch_size=4)),
      })
  """)
  w1, b1, w2, b2 = result["weights"]
  x = np.asarray(result["x"])
  expected = _mlp_references(w1, b1, w2, b2, x, np.arange(10) % 3)
  for name in ("mas", "mas_batched", "local_mas", "fisher"):
    _close(result[name], expected[name])
  _close(result["mas_array"], expected["mas"])
  _close(result["num_samples"],
         _mlp_references(w1, b1, w2, b2, x[:6], np.arange(6) % 3)["mas"])


def test_importance_and_batch_statistics_equal_tensorflow_on_a_conv_net(
    backend):
  # TensorFlow's closed forms per layer; the other backends' vmap of
  # per-sample gradients.
  code = """
      from keras_mas import importance
      from keras_mas.core import batch_statistics
      keras.utils.set_random_seed(0)
      inputs = keras.Input((6, 6, 2))
      h = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
      h = keras.layers.BatchNormalization()(h)
      h = keras.layers.Flatten()(keras.layers.Dropout(0.5)(h))
      h = keras.layers.LayerNormalization()(
          keras.layers.Dense(5, activation="tanh")(h))
      model = keras.Model(inputs, keras.layers.Dense(4)(h))
      set_weights(model, 3)
      x = np.random.default_rng(3).normal(size=(9, 6, 6, 2)).astype("float32")
      y = np.arange(9) % 4
      emit({
          "mas": arrays(importance.mas(model, x, batch_size=4)),
          "local_mas": arrays(importance.local_mas(model, x, batch_size=4)),
          "fisher": arrays(importance.fisher(model, (x, y), batch_size=4)),
          "fisher_true": arrays(importance.fisher(model, x, empirical=False,
                                                  batch_size=9)),
          "batch_norm": [arrays(pair) for pair in
                         batch_statistics.population_statistics(
                             model, x, batch_size=4)],
      })
  """
  jax_result = _run(code, backend)
  tf_result = _run(code, backend="tensorflow")
  for name in ("mas", "local_mas", "fisher"):
    _close(jax_result[name], tf_result[name], rtol=1e-4)
  # BatchNormalization's population statistics (the app's default policy).
  for jax_pair, tf_pair in zip(jax_result["batch_norm"],
                               tf_result["batch_norm"]):
    _close(jax_pair, tf_pair)
  # Sampled labels differ between the backends' generators: only finite.
  assert all(np.all(np.isfinite(a)) for a in jax_result["fisher_true"])


_TRAINING = """
    model = mlp(keras_mas.MASModel)
    model.track_path_integral()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = np.arange(64) % 3
    fit = dict(epochs=2, verbose=0, shuffle=False, batch_size=16)
    out = {"plain": model.fit(x, y, **fit).history["loss"]}
    out["si"] = arrays(keras_mas.importance.path_integral(model))
    model.consolidate(x, strength=5.0)
    model.reset_optimizer()
    history = model.fit(x, (y + 1) % 3, **fit).history
    out["gradient"] = [history["loss"], history["mas_penalty"],
                       history["task_loss"]]
    model.penalty_mode = "proximal"
    history = model.fit(x, (y + 1) % 3, **fit).history
    out["proximal"] = [history["loss"], history["mas_penalty"]]
    model.penalty_mode = "gradient"
    model.penalty_log_interval = 3
    history = model.fit(x, (y + 2) % 3, **fit).history
    out["interval"] = [history["loss"], history["mas_penalty"]]
    out["evaluate"] = model.evaluate(x, y, verbose=0, return_dict=True)
    out["penalty"] = float(model.mas_penalty())
    out["weights"] = arrays(model.weights)
    emit(out)
"""


def test_fit_with_the_penalty_equals_tensorflow_step_for_step(backend):
  # Both penalty modes, the log interval, SI's path integral, the optimizer
  # reset and evaluate: the step is TensorFlow's, to float precision.
  jax_result = _run(_TRAINING, backend)
  tf_result = _run(_TRAINING, backend="tensorflow")
  assert jax_result.keys() == tf_result.keys()
  for key in jax_result:
    if key == "evaluate":
      assert jax_result[key].keys() == tf_result[key].keys()
      _close(list(jax_result[key].values()), list(tf_result[key].values()))
    else:
      _close(jax_result[key], tf_result[key])
  assert jax_result["gradient"][1][-1] > 0  # the penalty was on


# Each term of the train step on its own, a few steps each, from the same
# weights, Ω, θ* and λ on every backend: the logs of every step and every
# variable after them (weights, Ω, θ*, SI's ω and start, the optimizer's).
_TERMS = """
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = np.arange(64) % 3
    optimizers = keras.optimizers

    def run(mode="gradient", interval=1, optimizer=None, regularized=False,
            frozen=False):
      inputs = keras.Input((5,))
      extra = {}
      if regularized:  # `add_loss` in the forward pass, and `model.losses`.
        extra = dict(activity_regularizer=keras.regularizers.L2(0.01),
                     kernel_regularizer=keras.regularizers.L2(0.02))
      hidden = keras.layers.Dense(7, activation="relu", **extra)(inputs)
      model = keras_mas.MASModel(inputs, keras.layers.Dense(3)(hidden))
      set_weights(model)
      model.track_path_integral()
      rng = np.random.default_rng(1)
      for v, omega, anchor in model.mas_variables:
        omega.assign(rng.uniform(0.5, 2.0, size=v.shape).astype("float32"))
        anchor.assign((numpy(v) + rng.normal(scale=0.3, size=v.shape))
                      .astype("float32"))
      model.strength = 2.0
      model.penalty_mode = mode
      model.penalty_log_interval = interval
      if frozen:  # Counted in the penalty's value, not in its gradient.
        model.layers[1].trainable = False
      model.compile(optimizer or optimizers.SGD(0.1, momentum=0.5),
                    keras.losses.SparseCategoricalCrossentropy(
                        from_logits=True))
      steps = []
      record = keras.callbacks.LambdaCallback(
          on_train_batch_end=lambda batch, logs: steps.append(
              [float(logs[k]) for k in ("loss", "task_loss", "mas_penalty")]))
      model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                callbacks=[record])
      return {"logs": steps, "weights": arrays(model.weights),
              "optimizer": arrays(model.optimizer.variables),
              "si": [float(np.sum(np.abs(numpy(w))))
                     for w in model.path_integral.integrals]}

    decaying = optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
    emit({
        "gradient": run(),
        # The proximal step at the learning rate after the update.
        "proximal": run("proximal", optimizer=optimizers.SGD(decaying,
                                                             momentum=0.5)),
        # Due at the first step (empty tracker) and the fourth.
        "interval": run(interval=3),
        "loss_scale": run(optimizer=optimizers.LossScaleOptimizer(
            optimizers.SGD(0.1, momentum=0.5), initial_scale=2.0 ** 10,
            dynamic_growth_steps=2)),
        "add_loss": run(regularized=True),
        "frozen": run(frozen=True),
    })
"""


def test_each_term_of_jaxs_step_equals_tensorflows_step_for_step(
    jax_backend):
  _check_each_term_against_tensorflow(jax_backend)


@pytest.mark.slow
def test_each_term_of_pytorchs_step_equals_tensorflows_step_for_step(
    torch_backend):
  # PyTorch's step is TensorFlow's own code, eager (slow: CI runs JAX's).
  _check_each_term_against_tensorflow(torch_backend)


def _check_each_term_against_tensorflow(backend):
  # The penalty's gradient, the proximal step, the log interval, loss
  # scaling, SI's path integral, `add_loss` losses and a frozen layer, each
  # compared with TensorFlow's step after every step.
  result = _run(_TERMS, backend)
  expected = _run(_TERMS, backend="tensorflow")
  assert result.keys() == expected.keys()
  for case in expected:
    assert len(result[case]["logs"]) == len(expected[case]["logs"]) == 4
    for key in ("logs", "weights", "optimizer", "si"):
      _close(result[case][key], expected[case][key])
  for outcome in (result, expected):
    # Loss scaling changes nothing, the penalty's gradient included.
    for key in ("logs", "weights"):
      _close(outcome["loss_scale"][key], outcome["gradient"][key])
    # The logs are the epoch's running means. With the interval, the
    # computed values alone count: the first stands in for the next two,
    # then the fourth joins it.
    penalties = [step[2] for step in outcome["interval"]["logs"]]
    means = [step[2] for step in outcome["gradient"]["logs"]]
    assert penalties[1] == penalties[2] == penalties[0] == means[0]
    _close(penalties[3], (means[0] + 4 * means[3] - 3 * means[2]) / 2,
           rtol=1e-4)  # Running means taken apart: some cancellation.
    # The penalty was on and moved the weights; SI's ω accumulated.
    assert all(step[2] > 0 for step in outcome["gradient"]["logs"])
    assert all(integral > 0 for integral in outcome["gradient"]["si"])
    # The regularizers' losses count in the task loss.
    assert (outcome["add_loss"]["logs"][0][1]
            > outcome["gradient"]["logs"][0][1])


def test_pytorchs_penalty_gradient_is_the_same_with_the_scale_on_device(
    torch_backend):
  # On CPUs PyTorch's step reads `2λ` on the host and folds it into one
  # addition; on an accelerator it stays on the device. The two give the
  # same `g + c·Ω(θ − θ*)`, also where a gradient is missing or the
  # variable's dtype is not float32.
  result = _run("""
    import torch
    from keras_mas.core import penalty
    rng = np.random.default_rng(0)
    tensor = lambda *shape: torch.tensor(
        rng.normal(size=shape).astype("float32"))
    gradients = [tensor(3, 2), None, tensor(4)]
    weighted = [tensor(3, 2), tensor(5), tensor(4)]
    dtypes = ["float32", "float32", "float16"]
    steps = {host: penalty._torch_steps(gradients, weighted, dtypes,
                                        torch.tensor(0.7), host_scalar=host)
             for host in (True, False)}
    emit({"host": [s.float().tolist() for s in steps[True]],
          "device": [s.float().tolist() for s in steps[False]],
          "dtypes": [str(s.dtype) for s in steps[True] + steps[False]],
          "expected": [((0 if g is None else g) + 0.7 * w).tolist()
                       for g, w in zip(gradients, weighted)]})
  """, torch_backend)
  assert result["dtypes"] == ["torch.float32", "torch.float32",
                              "torch.float16"] * 2
  for key in ("host", "device"):
    _close(result[key][:2], result["expected"][:2])
    _close(result[key][2], result["expected"][2], rtol=1e-3)  # float16


def test_penalty_keeps_important_weights_near_their_anchors_in_both_modes(
    backend):
  result = _run(backend=backend, code="""
      x = np.random.default_rng(0).normal(size=(96, 5)).astype("float32")
      y_a, y_b = np.arange(96) % 3, (np.arange(96) // 2) % 3

      def drift(strength, mode):
        model = mlp(keras_mas.MASModel)
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        model.fit(x, y_a, epochs=3, verbose=0, shuffle=False)
        model.consolidate(x, strength=strength)
        model.penalty_mode = mode
        history = model.fit(x, y_b, epochs=3, verbose=0, shuffle=False)
        moved = sum(float(np.sum(numpy(o) * np.square(
            numpy(v) - numpy(a))))
            for v, o, a in model.mas_variables)
        return moved, history.history["mas_penalty"][-1]

      emit({mode: [drift(0.0, mode), drift(1.0, mode)]
            for mode in ("gradient", "proximal")})
  """)
  for mode, ((free, free_penalty), (held, penalty)) in result.items():
    assert free_penalty == 0.0, mode
    assert penalty > 0.0, mode
    assert held < 0.75 * free, (mode, held, free)


def test_consolidate_with_every_estimator_and_keras_round_trip(backend,
                                                               tmp_path):
  result = _run(backend=backend, code=f"""
      model = mlp(keras_mas.MASModel)
      model.track_path_integral()
      model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
          from_logits=True))
      x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
      y = np.arange(40) % 3
      out = {{}}
      for method in sorted(keras_mas.importance.ESTIMATORS):
        model.fit(x, y, epochs=1, verbose=0)
        data = (x, y) if method == "fisher" else x
        new = model.consolidate(data, method=method, accumulate="decay",
                                alpha=0.5)
        out[method] = [float(np.sum(numpy(n))) for n in new]
      model.strength = 2.5
      model.penalty_mode = "proximal"
      path = os.path.join({str(tmp_path)!r}, "m.keras")
      model.save(path)
      loaded = keras.models.load_model(path)
      out["saved"] = [model.strength, model.consolidated_tasks,
                      model.penalty_mode, float(model.mas_penalty())]
      out["loaded"] = [loaded.strength, loaded.consolidated_tasks,
                       loaded.penalty_mode, float(loaded.mas_penalty())]
      out["same"] = all(np.array_equal(a, b) for a, b in zip(
          model.get_weights(), loaded.get_weights()))
      out["sums"] = [len(model.importances), len(loaded.importances)]
      loaded.fit(x, y, epochs=1, verbose=0)  # trains after loading
      emit(out)
  """)
  for method in ("fisher", "local_mas", "mas", "path_integral", "uniform"):
    assert len(result[method]) == 4 and all(
        np.isfinite(s) and s >= 0 for s in result[method]), method
  assert result["uniform"] == [35.0, 7.0, 21.0, 3.0]
  assert result["mas"][0] > 0 and result["path_integral"][0] > 0
  assert result["loaded"][:3] == [2.5, 5, "proximal"]
  assert result["loaded"] == pytest.approx(result["saved"])
  assert result["same"]


def test_regularizer_attach_fit_and_save(backend, tmp_path):
  result = _run(backend=backend, code=f"""
      from keras_mas import regularizers
      model = mlp()
      layer = model.layers[1]
      omega = np.full(layer.kernel.shape, 2.0, "float32")
      anchor = np.zeros(layer.kernel.shape, "float32")
      regularizers.attach(layer, "kernel", keras_mas.MASRegularizer(
          strength=0.5, importance=omega, anchor=anchor))
      expected = 0.5 * 2.0 * float(np.sum(np.square(
          numpy(layer.kernel))))
      penalty = float(sum(model.losses))
      model.compile(keras.optimizers.SGD(0.1), "mse")
      x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
      y = np.zeros((32, 3), "float32")
      before = float(np.sum(np.square(numpy(layer.kernel))))
      model.fit(x, y, epochs=3, verbose=0)
      after = float(np.sum(np.square(numpy(layer.kernel))))
      path = os.path.join({str(tmp_path)!r}, "r.keras")
      model.save(path)
      loaded = keras.models.load_model(path)
      reg = loaded.layers[1].kernel_regularizer
      emit({{"penalty": penalty, "expected": expected, "shrunk": after < before,
             "type": type(reg).__name__, "strength": float(reg.strength),
             "omega": float(np.mean(numpy(reg.importance))),
             "loaded_penalty": float(sum(loaded.losses)),
             "penalty_now": float(sum(model.losses))}})
  """)
  tolerances.assert_close(result["penalty"], result["expected"])
  assert result["shrunk"]
  assert result["type"] == "MASRegularizer"
  assert result["strength"] == 0.5 and result["omega"] == 2.0
  assert result["loaded_penalty"] == pytest.approx(result["penalty_now"],
                                                   rel=1e-5)


def test_from_model_on_functional_sequential_and_subclassed_models(backend):
  result = _run(backend=backend, code="""
      @keras.saving.register_keras_serializable(package="test")
      class Net(keras.Model):
        def __init__(self, **kwargs):
          super().__init__(**kwargs)
          self.hidden = keras.layers.Dense(7, activation="relu")
          self.out = keras.layers.Dense(3)
        def call(self, x):
          return self.out(self.hidden(x))

      sequential = keras.Sequential([keras.Input((5,)),
                                     keras.layers.Dense(7, activation="relu"),
                                     keras.layers.Dense(3)])
      subclassed = Net()
      subclassed(np.zeros((1, 5), "float32"))
      x = np.random.default_rng(0).normal(size=(48, 5)).astype("float32")
      y = np.arange(48) % 3
      out = {}
      for name, base in [("functional", mlp()), ("sequential", sequential),
                         ("subclassed", subclassed)]:
        set_weights(base)
        model = keras_mas.MASModel.from_model(base)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        model.fit(x, y, epochs=1, verbose=0)
        model.consolidate(x, strength=1.0)
        history = model.fit(x, (y + 1) % 3, epochs=1, verbose=0).history
        # No weight is copied: training the MASModel trains `base`.
        shared = np.array_equal(numpy(base.trainable_variables[0]),
                                numpy(model.trainable_variables[0]))
        out[name] = [type(model).__name__, shared,
                     history["mas_penalty"][-1] > 0,
                     len(model.importances)]
      emit(out)
  """)
  assert result["functional"] == ["FunctionalMASModel", True, True, 4]
  assert result["sequential"] == ["FunctionalMASModel", True, True, 4]
  assert result["subclassed"] == ["WrappedMASModel", True, True, 4]


# Slow: what it shows on JAX and PyTorch follows, in CI, from their steps
# equalling TensorFlow's (test_fit_with_the_penalty_equals_tensorflow_...)
# and TensorFlow's own two-task tests.
@pytest.mark.slow
def test_two_task_flow_mas_forgets_less_than_fine_tuning(backend):
  result = _run(backend=backend, code="""
      rng = np.random.default_rng(0)
      x_a = rng.normal(size=(200, 5)).astype("float32")
      y_a = (x_a[:, 0] > 0).astype("int64")
      x_b = rng.normal(size=(200, 5)).astype("float32")
      y_b = (x_b[:, 1] > 0).astype("int64") + 1

      def run(strength):
        model = mlp(keras_mas.MASModel, hidden=16)
        model.compile(keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), metrics=["accuracy"])
        model.fit(x_a, y_a, epochs=20, verbose=0)
        before = model.evaluate(x_a, y_a, verbose=0, return_dict=True)
        model.consolidate(x_a, strength=strength)
        model.reset_optimizer()
        model.fit(x_b, y_b, epochs=20, verbose=0)
        after_a = model.evaluate(x_a, y_a, verbose=0, return_dict=True)
        after_b = model.evaluate(x_b, y_b, verbose=0, return_dict=True)
        return [before["accuracy"], after_a["accuracy"],
                after_b["accuracy"], after_a["mas_penalty"]]

      emit({"finetune": run(0.0), "mas": run(10.0)})
  """)
  finetune, mas = result["finetune"], result["mas"]
  assert finetune[0] > 0.9 and mas[0] > 0.9
  forgot_finetune = finetune[0] - finetune[1]
  forgot_mas = mas[0] - mas[1]
  assert forgot_mas < forgot_finetune, result
  assert mas[3] > 0 and finetune[3] == 0


def test_main_job_trains_reports_and_exports(backend, tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  done = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "apps", "sequential_finetune.py"),
       f"--workdir={workdir}", "--num_tasks=2", "--epochs=2", "--verbose=0"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["method"] == "mas" and len(results["accuracy_matrix"]) == 2
  assert results["accuracy_matrix"][0][0] > 0.5
  export = os.path.join(workdir, "export", "task_1")
  if backend == "jax":
    # The SavedModel (through jax2tf) serves in plain TensorFlow.
    served = _run(f"""
        import tensorflow as tf
        served = tf.saved_model.load({export!r})
        logits = served.serve(tf.zeros((3, 8, 8, 1)))
        emit(list(logits.shape))
    """, backend="tensorflow")
  else:
    # The `torch.export` program serves in plain PyTorch, without Keras.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import json, sys, torch
            program = torch.export.load({export!r} + "/serve.pt2").module()
            logits = program(torch.zeros((3, 8, 8, 1)))
            assert "keras" not in sys.modules
            print(json.dumps(list(logits.shape)))
        """)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
  assert served == [3, 10]


def test_data_parallel_on_two_devices_fits_and_consolidates(jax_backend):
  # keras.distribution.DataParallel over two CPU devices: `fit` with the
  # penalty runs on both; Ω measured under it equals one device's.
  result = _run("""
      import jax
      devices = jax.devices()
      assert len(devices) == 2, devices
      rng = np.random.default_rng(0)
      x = rng.standard_normal((256, 5)).astype("float32")
      y = (x[:, 0] > 0).astype("int64")
      parallel = keras.distribution.DataParallel(devices=devices)
      keras.distribution.set_distribution(parallel)
      model = mlp(keras_mas.MASModel, outputs=2)
      model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
          from_logits=True))
      model.fit(x, y, epochs=1, batch_size=32, verbose=0)
      sharded = arrays(model.consolidate(x, strength=1.0))
      keras.distribution.set_distribution(None)
      one_device = arrays(keras_mas.importance.mas(model, x))
      keras.distribution.set_distribution(parallel)
      history = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
      emit({"sharded": sharded, "one_device": one_device,
            "penalty": history["mas_penalty"]})
      """, jax_backend, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  _close(result["sharded"], result["one_device"])
  assert all(np.sum(o) > 0 for o in result["sharded"])
  assert result["penalty"][-1] > 0


def test_dense_closed_form_equals_the_mapped_gradients(backend):
  # The main job's case (Dense layers on (batch, features)) takes the closed
  # form f(A)ᵀ f(Δ); it must equal vmap(grad) over the samples, for MAS and
  # Fisher. A Dense layer on sequences declines it, exactly.
  module = {"jax": "_jax_per_sample", "torch": "_torch_per_sample"}[backend]
  result = _run(backend=backend, code=f"""
      from keras_mas.importance import {module} as jps
      used = []
      closed_form = jps._dense_sums
      def spy(*args, **kwargs):
        sums = closed_form(*args, **kwargs)
        used.append(sums is not None)
        return sums
      jps._dense_sums = spy
      rng = np.random.default_rng(1)
      x = rng.standard_normal((37, 5)).astype("float32")
      y = rng.integers(0, 3, 37)
      seq = rng.standard_normal((11, 4, 5)).astype("float32")
      def measure(model, data, labels=None):
        return {{"mas": arrays(keras_mas.importance.mas(model, data)),
                "fisher": arrays(keras_mas.importance.fisher(
                    model, (data, labels))) if labels is not None else None}}
      flat = measure(mlp(), x, y)
      x_in = keras.Input((4, 5))
      sequences = keras.Model(x_in, keras.layers.Dense(3)(
          keras.layers.Dense(7, activation="relu")(x_in)))
      set_weights(sequences)
      on_sequences = measure(sequences, seq)
      closed = list(used)
      from keras_mas.importance import _closed_forms, _functional
      _functional.dense_units = lambda model, variables: None
      _closed_forms.CLOSED_FORM_UNITS = ()  # vmap(grad) of the whole model.
      emit({{"closed": closed, "flat": flat, "on_sequences": on_sequences,
            "mapped_flat": measure(mlp(), x, y),
            "mapped_sequences": measure(sequences, seq)}})
      """)
  assert result["closed"][:2] == [True, True]  # MAS and Fisher on the MLP.
  assert result["closed"][2:] == [False]  # Sequences: declined.
  for key in ("mas", "fisher"):
    _close(result["flat"][key], result["mapped_flat"][key])
  _close(result["on_sequences"]["mas"], result["mapped_sequences"]["mas"])


def test_the_readme_library_example_runs_as_written(backend, tmp_path):
  # "Use it on your model": the first Python block of the README.
  with open(os.path.join(_ROOT, "README.md"), encoding="utf-8") as f:
    block = re.findall(r"^```python\n(.*?)^```$", f.read(),
                       flags=re.S | re.M)[0]
  assert "consolidate" in block and "load_model" in block
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=_ROOT)
  done = subprocess.run(
      [sys.executable, "-c",
       block + "\nassert keras.backend.backend() == "
       f"{backend!r}\nprint(restored.strength, restored.consolidated_tasks)"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  strength, tasks = done.stdout.strip().splitlines()[-1].split()
  assert float(strength) == pytest.approx(0.1) and tasks == "1"


_REHEARSAL = """
    import tensorflow as tf
    from keras_mas import task_free
    model = mlp(keras_mas.MASModel)
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.consolidate(np.ones((4, 5), "float32"), strength=1.0)
    buffer = task_free.HardBuffer(6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype("float32")
    y = (np.arange(24) % 3).astype("int64")
    stream = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    try:
      model.rehearsal = buffer
      history = model.fit(stream, epochs=1, verbose=0, shuffle=False).history
    except ValueError as e:
      emit({"error": str(e)})
    else:
      emit({"loss": history["loss"], "weights": arrays(model.weights),
            "buffer": [buffer.inputs.tolist(), buffer.labels.tolist(),
                       buffer.losses.tolist()],
            "incoming": [buffer.incoming_loss, buffer.incoming_count,
                         buffer.incoming_correct]})
"""


def test_rehearsal_buffer_trains_as_on_tensorflow_or_is_refused(backend):
  # Task-free streams: the hard buffer joins each batch and keeps the
  # hardest samples. PyTorch runs its TensorFlow ops eagerly, with the same
  # result as TensorFlow's traced step; JAX's compiled step refuses it.
  result = _run(_REHEARSAL, backend)
  if backend == "jax":
    assert "Invalid value for argument `rehearsal`" in result["error"]
    return
  expected = _run(_REHEARSAL, backend="tensorflow")
  assert "error" not in expected and "error" not in result, result
  _close(result["loss"], expected["loss"])
  _close(result["weights"], expected["weights"])
  for got, want in zip(result["buffer"], expected["buffer"]):
    _close(got, want)
  assert result["incoming"][1:] == expected["incoming"][1:]
  _close(result["incoming"][0], expected["incoming"][0])


def test_torch_export_writes_one_program_per_head_and_skips_raw_inputs(
    torch_backend, tmp_path):
  # PyTorch's export: `serve.pt2` and one program per head, each equal to
  # the model's (sliced) outputs; a model with a preprocessor is skipped
  # with a warning, nothing written.
  result = _run(backend=torch_backend, code=f"""
      import torch
      from keras_mas.experiments import export
      model = mlp(outputs=4)
      path = os.path.join({str(tmp_path)!r}, "e")
      export.ServingExport(model, (5,)).write(path, heads={{"b": (1, 3)}})
      x = torch.tensor(np.random.default_rng(0).normal(
          size=(7, 5)).astype("float32"))
      want = numpy(model(x, training=False))
      got = {{name: numpy(torch.export.load(os.path.join(
          path, name + ".pt2")).module()(x)) for name in ("serve", "b")}}
      model.preprocessor = lambda inputs: inputs
      raw = os.path.join({str(tmp_path)!r}, "raw")
      export.ServingExport(model, (5,)).write(raw)
      emit({{"files": sorted(os.listdir(path)), "want": want.tolist(),
             "serve": got["serve"].tolist(), "head": got["b"].tolist(),
             "raw": os.path.exists(raw)}})
  """)
  assert result["files"] == ["b.pt2", "serve.pt2"]
  want = np.asarray(result["want"])
  tolerances.assert_close(result["serve"], want)
  tolerances.assert_close(result["head"], want[:, 1:3])
  assert not result["raw"]


@pytest.mark.parametrize("frozen_backend", ["tensorflow", _JAX, _TORCH])
def test_fit_with_every_layer_frozen_changes_nothing(frozen_backend):
  # Nothing to differentiate: the step still runs and logs the penalty.
  result = _run(backend=frozen_backend, code="""
      model = mlp(keras_mas.MASModel)
      model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
          from_logits=True))
      x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
      model.consolidate(x, strength=1.0)
      for v, _, anchor in model.mas_variables:
        anchor.assign(np.zeros(v.shape, "float32"))
      before = [numpy(v) for v in model.weights]
      for layer in model.layers:
        layer.trainable = False
      history = model.fit(x, np.arange(16) % 3, epochs=1, verbose=0).history
      emit({"same": all(np.array_equal(a, numpy(v))
                        for a, v in zip(before, model.weights)),
            "penalty": history["mas_penalty"][-1]})
  """)
  assert result["same"] and result["penalty"] > 0
