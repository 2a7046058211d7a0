"""Crashes, bad input and numerical faults never lose what was learned."""

import json
import os
import shutil
import sys
import zipfile

import hypothesis
from hypothesis import strategies as st
import keras
import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
import app_runner  # pylint: disable=g-bad-import-order
import keras_mas
from keras_mas import callbacks
from keras_mas import importance
from keras_mas import tasks
from keras_mas import training
import tolerances

_FLAGS = ["--recipe=split", "--num_tasks=3", "--epochs=1",
          "--hidden_units=16", "--batch_size=16", "--verbose=0"]
_METRICS = ("accuracy_matrix", "baseline", "acc", "bwt", "fwt", "forgetting")


def _app(workdir, *extra, crash_at=None):
  return app_runner.run_finetune(workdir, *_FLAGS, *extra, crash_at=crash_at,
                                 timeout=300)


def _final_state(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  model = keras.models.load_model(
      os.path.join(workdir, "checkpoints", "task_2", "model.keras"))
  return results, [v.numpy() for v in model.importances + model.anchors]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("whole") / "run")
  done = _app(workdir)
  assert done.returncode == 0, done.stderr
  return _final_state(workdir)


# A checkpoint's and an export's half-writes are also covered by
# checkpoints_test and export_test in-process, a kill between tasks by the
# `fit` point here: their app runs are slow.
@pytest.mark.parametrize("point", [
    "fit", pytest.param("consolidate", marks=pytest.mark.slow),
    pytest.param("checkpoint", marks=pytest.mark.slow),
    pytest.param("export", marks=pytest.mark.slow)])
def test_sigkill_then_resume_equals_an_uninterrupted_run(
    point, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  crashed = _app(workdir, crash_at=f"{point}:1")
  assert crashed.returncode == -9, crashed.stderr  # really killed
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  resumed = _app(workdir, "--resume")
  assert resumed.returncode == 0, resumed.stderr
  results, state = _final_state(workdir)
  expected_results, expected_state = uninterrupted
  for key in _METRICS:
    np.testing.assert_allclose(results[key], expected_results[key],
                               atol=1e-6, err_msg=key)
  for got, want in zip(state, expected_state):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for folder in ("checkpoints", "export"):
    assert not [e for e in os.listdir(os.path.join(workdir, folder))
                if ".partial-" in e]
  assert sorted(os.listdir(os.path.join(workdir, "export"))) == [
      "task_0", "task_1", "task_2"]


_IN_TASK = ["--epochs=3", "--checkpoint_seconds=0"]


@pytest.fixture(scope="module")
def uninterrupted_3_epochs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("whole3") / "run")
  done = _app(workdir, *_IN_TASK)
  assert done.returncode == 0, done.stderr
  return _final_state(workdir)


@pytest.mark.parametrize("point, every, resumes_at", [
    # SIGKILL mid-epoch after the epoch-end checkpoint: from epoch 1.
    ("in_task", [], (1, 0)),
    # SIGKILL mid-epoch after a checkpoint every 8 steps: inside epoch 0.
    # Slow: a resume inside an epoch is the SIGTERM case's too, in CI.
    pytest.param("in_task", ["--checkpoint_steps=8",
                             "--checkpoint_seconds=60"], (0, 8),
                 marks=pytest.mark.slow),
    # SIGTERM: a checkpoint where it stopped, inside epoch 1.
    ("sigterm", [], None),
])
def test_stopped_inside_a_task_then_resumed_equals_an_uninterrupted_run(
    point, every, resumes_at, uninterrupted_3_epochs, tmp_path):
  workdir = str(tmp_path / "run")
  flags = _IN_TASK + every
  stopped = _app(workdir, *flags, crash_at=f"{point}:1")
  if point == "in_task":
    assert stopped.returncode == -9, stopped.stderr[-3000:]
  else:  # Finished the step, wrote a checkpoint there, said so, exited 75.
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    lines = [l for l in stopped.stderr.splitlines() if "SIGTERM" in l]
    assert len(lines) == 1 and "inside task 1 at epoch 1, batch" in lines[0]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  refused = _app(workdir, *flags)  # The same command without --resume.
  assert refused.returncode == 1 and "inside task 1" in refused.stderr
  resumed = _app(workdir, *flags, "--resume")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  results, state = _final_state(workdir)
  expected_results, expected_state = uninterrupted_3_epochs
  (resume,) = results["resumes"]
  assert resume["task"] == 1
  if resumes_at is not None:
    assert (resume["epoch"], resume["batch"]) == resumes_at
  else:
    assert resume["epoch"] == 1 and resume["batch"] > 0
  for key in _METRICS:
    np.testing.assert_allclose(results[key], expected_results[key],
                               atol=1e-6, err_msg=key)
  for got, want in zip(state, expected_state):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert not [e for e in os.listdir(os.path.join(workdir, "checkpoints"))
              if e.startswith("in_task")]  # Gone once the task's own was.


# --- Large λ. ---------------------------------------------------------------


def _two_task_model(penalty_mode, strength):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.data[:400] / 16).astype("float32")
  y = digits.target[:400]
  keras.utils.set_random_seed(0)
  inputs = keras.Input((64,))
  hidden = keras.layers.Dense(32, activation="relu")(inputs)
  model = keras_mas.MASModel(inputs, keras.layers.Dense(10)(hidden))
  model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  model.fit(x, y, epochs=3, verbose=0)
  model.consolidate(x, strength=strength)
  model.penalty_mode = penalty_mode
  permuted = x[:, np.random.default_rng(0).permutation(64)]
  return model, x, y, permuted


def test_gradient_penalty_beyond_its_limit_stops_with_weights_restored():
  model, _, y, permuted = _two_task_model("gradient", 1e5)
  anchors = [a.numpy() for a in model.anchors]
  with pytest.raises(callbacks.TrainingDivergedError,
                     match=r"λ=100000.*stable for λ < [0-9.]+.*proximal"):
    model.fit(permuted, y, epochs=3, verbose=0,
              callbacks=[callbacks.DivergenceGuard()])
  for v, a in zip(model.trainable_variables, anchors):
    np.testing.assert_array_equal(v.numpy(), a)  # start of the failed epoch


def test_proximal_penalty_is_stable_far_beyond_that_limit():
  model, x, y, permuted = _two_task_model("proximal", 1e7)
  before = model.evaluate(x, y, verbose=0)[1]
  history = model.fit(permuted, y, epochs=3, verbose=0,
                      callbacks=[callbacks.DivergenceGuard()])
  assert np.all(np.isfinite(history.history["loss"]))
  assert model.evaluate(x, y, verbose=0)[1] >= before - 0.1
  for v, a, o in zip(model.trainable_variables, model.anchors,
                     model.importances):
    important = o.numpy() > 1e-3
    np.testing.assert_allclose(v.numpy()[important], a.numpy()[important],
                               atol=1e-3)


def test_proximal_step_is_the_exact_minimiser_for_sgd():
  model, _, y, permuted = _two_task_model("proximal", 3.0)
  model.compile(keras.optimizers.SGD(0.05),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.penalty_mode = "proximal"
  plain = keras.models.clone_model(model)
  plain.set_weights(model.get_weights())
  plain_model = keras.Model(plain.inputs, plain.outputs)
  plain_model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
  plain_model.fit(permuted[:32], y[:32], batch_size=32, epochs=1, verbose=0,
                  shuffle=False)
  model.fit(permuted[:32], y[:32], batch_size=32, epochs=1, verbose=0,
            shuffle=False)
  for v, p, o, a in zip(model.trainable_variables,
                        plain_model.trainable_variables, model.importances,
                        model.anchors):
    c = 2 * 0.05 * 3.0 * o.numpy()
    expected = (p.numpy() + c * a.numpy()) / (1 + c)
    tolerances.assert_close(v.numpy(), expected)


# --- Properties. ------------------------------------------------------------

_SETTINGS = hypothesis.settings(max_examples=12, deadline=None,
                                suppress_health_check=list(
                                    hypothesis.HealthCheck))


def _small_model(seed, scale=None, zero_output=False):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((4,))
  hidden = keras.layers.Dense(5, activation="tanh")(inputs)
  out = keras.layers.Dense(3, kernel_initializer="zeros" if zero_output
                           else "glorot_uniform")(hidden)
  if scale is not None:
    out = keras.layers.Rescaling(scale)(out)
  return keras_mas.MASModel(inputs, out)


_INPUTS = st.integers(0, 2**16).map(
    lambda s: np.random.default_rng(s).normal(size=(6, 4)).astype("float32"))


@_SETTINGS
@hypothesis.given(seed=st.integers(0, 100), x=_INPUTS)
def test_importance_is_non_negative(seed, x):
  model = _small_model(seed)
  for estimator in (importance.mas, importance.local_mas):
    assert all(np.all(o.numpy() >= 0) for o in estimator(model, x))


@_SETTINGS
@hypothesis.given(x=_INPUTS)
def test_zero_output_gives_zero_importance(x):
  model = _small_model(0, zero_output=True)
  assert all(not np.any(o.numpy()) for o in importance.mas(model, x))


@_SETTINGS
@hypothesis.given(c=st.floats(0.1, 10.0), x=_INPUTS)
def test_scaling_the_output_by_c_scales_importance_by_c_squared(c, x):
  base = importance.mas(_small_model(1, scale=1.0), x)
  scaled = importance.mas(_small_model(1, scale=c), x)
  for b, s in zip(base, scaled):
    expected = c * c * b.numpy()
    # Another model's sums: the shared tolerances, the earlier 1e-6 a floor.
    tolerances.assert_close(s.numpy(), expected, rtol=1e-4, atol=max(
        1e-6, tolerances.ATOL_OF_SCALE * float(np.max(np.abs(expected)))))


@_SETTINGS
@hypothesis.given(t=st.floats(-5.0, 5.0), seed=st.integers(0, 100))
def test_penalty_is_zero_at_the_anchor_and_quadratic_away(t, seed):
  rng = np.random.default_rng(seed)
  omega, anchor, direction = (rng.random(6).astype("float32")
                              for _ in range(3))
  reg = keras_mas.MASRegularizer(0.7, importance=omega, anchor=anchor)
  assert float(reg(anchor)) == 0.0
  np.testing.assert_allclose(float(reg(anchor + t * direction)),
                             t * t * float(reg(anchor + direction)),
                             rtol=1e-4, atol=1e-6)


@_SETTINGS
@hypothesis.given(alpha=st.floats(0.0, 1.0), x=_INPUTS, other=_INPUTS)
def test_decay_is_a_convex_combination_and_sum_doubles(alpha, x, other):
  model = _small_model(2)
  first = [o.numpy() for o in model.consolidate(x)]
  new = [o.numpy() for o in model.consolidate(other, accumulate="decay",
                                              alpha=alpha)]
  for omega, f, n in zip(model.importances, first, new):
    lo, hi = np.minimum(f, n), np.maximum(f, n)
    assert np.all(omega.numpy() >= lo - 1e-6)
    assert np.all(omega.numpy() <= hi + 1e-6)
  twice = _small_model(2)
  once = [o.numpy() for o in twice.consolidate(x)]
  twice.consolidate(x)
  for omega, o in zip(twice.importances, once):
    np.testing.assert_allclose(omega.numpy(), 2 * o, rtol=1e-6)


# --- Bad input and saved state. ---------------------------------------------


def _trained_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  model = keras_mas.MASModel(inputs, keras.layers.Dense(3)(inputs))
  model.consolidate(np.ones((8, 4), "float32"), strength=2.0)
  return model


def _snapshot(model):
  return [v.numpy().copy() for v in model.variables]


_X = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
_LIBRARY_CASES = [
    ("wrong shape", lambda m: m.consolidate(np.ones((8, 5), "float32")),
     "argument `data`"),
    ("wrong rank", lambda m: m.consolidate(np.ones((8, 4, 2), "float32")),
     "argument `data`"),
    ("strings", lambda m: m.consolidate(np.array([["a"] * 4] * 2)),
     "argument `data`"),
    ("NaN inputs", lambda m: m.consolidate(np.full((4, 4), np.nan,
                                                   "float32")), "not finite"),
    ("infinite inputs", lambda m: m.consolidate(np.full((4, 4), np.inf,
                                                        "float32")),
     "not finite"),
    ("empty", lambda m: m.consolidate(np.zeros((0, 4), "float32")),
     "argument `data`"),
    ("num_samples > data", lambda m: m.consolidate(_X, num_samples=100),
     "argument `num_samples`"),
    ("num_samples 0", lambda m: m.consolidate(_X, num_samples=0),
     "argument `num_samples`"),
    ("batch_size 0", lambda m: m.consolidate(_X, batch_size=0),
     "argument `batch_size`"),
    ("negative strength", lambda m: m.consolidate(_X, strength=-1),
     "argument `strength`"),
    ("NaN strength", lambda m: m.consolidate(_X, strength=float("nan")),
     "argument `strength`"),
    ("infinite strength", lambda m: m.consolidate(_X, strength=float("inf")),
     "argument `strength`"),
    ("unknown method", lambda m: m.consolidate(_X, method="ewc++"),
     "argument `method`"),
    ("unknown accumulate", lambda m: m.consolidate(_X, accumulate="max"),
     "argument `accumulate`"),
    ("alpha out of range", lambda m: m.consolidate(_X, accumulate="decay",
                                                   alpha=-0.5),
     "argument `alpha`"),
    ("unknown penalty mode",
     lambda m: setattr(m, "penalty_mode", "implicit"),
     "argument `penalty_mode`"),
    ("strength setter", lambda m: setattr(m, "strength", float("nan")),
     "argument `strength`"),
    ("not data", lambda m: m.consolidate(object()), "argument `data`"),
]


@pytest.mark.parametrize("name, action, message", _LIBRARY_CASES,
                         ids=[c[0] for c in _LIBRARY_CASES])
def test_library_bad_input_is_named_and_changes_nothing(name, action,
                                                        message):
  del name
  model = _trained_model()
  before = _snapshot(model)
  with pytest.raises(ValueError, match=message):
    action(model)
  for b, v in zip(before, model.variables):
    np.testing.assert_array_equal(b, v.numpy())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  sequence = tasks.make_sequence("digits", "split", "domain", 2)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:48], task.y_train[:48]
    task.x_test, task.y_test = task.x_test[:16], task.y_test[:16]
  training.run_sequence(sequence, workdir, epochs=1, hidden_units=8,
                        verbose=0)
  return sequence, workdir


def _tree(workdir):
  listing = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        listing[os.path.relpath(path, workdir)] = f.read()
  return listing


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _lambda_in_config(path):
  """Hand-edit the .keras config to smuggle in a Lambda layer."""
  with zipfile.ZipFile(path) as z:
    files = {n: z.read(n) for n in z.namelist()}
  config = json.loads(files["config.json"])
  layers = config["config"]["layers"]
  layers[1]["class_name"] = "Lambda"
  layers[1]["module"] = "keras.layers"
  layers[1]["config"] = {"name": layers[1]["config"]["name"],
                         "function": {"class_name": "__lambda__", "config": {
                             "code": "print('pwned')", "defaults": None,
                             "closure": None}}}
  files["config.json"] = json.dumps(config).encode()
  with zipfile.ZipFile(path, "w") as z:
    for n, data in files.items():
      z.writestr(n, data)


def _bad_state_json(path):
  with open(path, "w") as f:
    f.write("{not json")


_RESUME_CASES = [
    ("truncated .keras", "model.keras", _truncate),
    ("hand-edited .keras with a lambda", "model.keras", _lambda_in_config),
    ("damaged state.json", "state.json", _bad_state_json),
]


@pytest.mark.parametrize("name, target, damage", _RESUME_CASES,
                         ids=[c[0] for c in _RESUME_CASES])
def test_damaged_checkpoint_is_refused_and_the_workdir_untouched(
    name, target, damage, finished_run, tmp_path):
  del name
  sequence, original = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  damage(os.path.join(workdir, "checkpoints", "task_1", target))
  before = _tree(workdir)
  with pytest.raises(ValueError, match="argument `resume`"):
    training.run_sequence(sequence, workdir, epochs=1, hidden_units=8,
                          resume=True, verbose=0)
  assert _tree(workdir) == before


def test_checkpoint_from_another_architecture_is_refused(finished_run,
                                                         tmp_path):
  sequence, original = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  before = _tree(workdir)
  with pytest.raises(ValueError, match="argument `resume`.*model='mlp' there, 'cnn' here"):
    training.run_sequence(sequence, workdir, epochs=1, hidden_units=8,
                          model="cnn", resume=True, verbose=0)
  assert _tree(workdir) == before


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
