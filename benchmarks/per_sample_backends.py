r"""Exact per-sample importance on JAX and PyTorch: closed forms or mapped.

  .venv/bin/python benchmarks/per_sample_backends.py --repeats=5

For JAX and PyTorch (where installed) a subprocess with `KERAS_BACKEND` set
times `importance.mas` on two models:

* `cnn`: 3×3 convolutions (16 then 32 filters, ReLU) each with 2×2 max
  pooling on 28×28×1 inputs, then a dense layer to 10;
* `text`: an embedding (vocabulary 1,000, width 64, 32 tokens), a 3-wide
  Conv1D (64 filters, ReLU), global max pooling, dense 64 (ReLU) and 10;

`--samples` samples (default 512) in batches of 64, three ways:

* batched: `per_sample=False`, `|Σ_batch g|`, one gradient per batch;
* closed forms: exact per-sample sums, each layer differentiated alone from
  the `δ` of one batched pass (`importance/_closed_forms.py`);
* mapped: exact per-sample sums from `vmap(grad)` of the whole model (the
  closed forms switched off: the code before them).

Each way's step is compiled first; then each repetition times the three in
turn (interleaved, so that load from other processes falls on all three),
and the medians (wall clock, and process CPU time) are printed: exact ÷
batched for both exact ways, and mapped ÷ closed forms. Ratios, not
seconds, are comparable across machines.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions.")
_SAMPLES = flags.DEFINE_integer("samples", 512, "Samples per importance pass.")
_ONLY = flags.DEFINE_list("backends", ["jax", "torch"], "Only these backends.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the report here "
    "(benchmarks/PER_SAMPLE_BACKENDS.md is the tracked one).")
_WORKER = flags.DEFINE_bool(
    "worker", False, "Internal: time on this process's backend, print JSON.")

_BATCH = 64
_WAYS = ("batched", "closed", "mapped")


def _models():
  """`{name: (build, inputs)}`, weights and inputs seeded."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def cnn():
    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu")(x)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    return keras.Model(x, keras.layers.Dense(10)(keras.layers.Flatten()(h)))

  def text():
    x = keras.Input((32,), dtype="int32")
    h = keras.layers.Embedding(1000, 64)(x)
    h = keras.layers.Conv1D(64, 3, activation="relu")(h)
    h = keras.layers.GlobalMaxPooling1D()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(x, keras.layers.Dense(10)(h))

  rng = np.random.default_rng(0)
  n = _SAMPLES.value
  return {
      "cnn": (cnn, rng.normal(size=(n, 28, 28, 1)).astype("float32")),
      "text": (text, rng.integers(0, 1000, (n, 32)).astype("int32")),
  }


def _seeded(build):
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  return build()


def _worker():
  """Times the three ways on each model; prints one JSON line."""
  import keras_mas  # pylint: disable=g-import-not-at-top
  from keras_mas.importance import _closed_forms  # pylint: disable=g-import-not-at-top
  from keras_mas.importance import _functional  # pylint: disable=g-import-not-at-top

  def timed(model, x, per_sample):
    """Wall-clock and process CPU seconds of one importance pass."""
    start, cpu = time.perf_counter(), time.process_time()
    keras_mas.importance.mas(model, x, per_sample=per_sample,
                             batch_size=_BATCH)
    return time.perf_counter() - start, time.process_time() - cpu

  results = {}
  for name, (build, x) in _models().items():
    models = {way: _seeded(build) for way in _WAYS}
    saved = _closed_forms.CLOSED_FORM_UNITS, _functional.dense_units
    for way in _WAYS:
      if way == "mapped":  # The step is built (and compiled) now, without.
        _closed_forms.CLOSED_FORM_UNITS = ()
        _functional.dense_units = lambda model, variables: None
      timed(models[way], x, way != "batched")
      _closed_forms.CLOSED_FORM_UNITS, _functional.dense_units = saved
    times = {way: [] for way in _WAYS}
    for _ in range(_REPEATS.value):
      for way in _WAYS:
        times[way].append(timed(models[way], x, way != "batched"))
    results[name] = {
        way: [statistics.median(w for w, _ in t),
              statistics.median(c for _, c in t)]
        for way, t in times.items()}
  print(json.dumps(results))


def _run_backend(backend):
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--worker",
       f"--repeats={_REPEATS.value}", f"--samples={_SAMPLES.value}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{backend} failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _report(results):
  lines = [
      "# Exact per-sample importance on JAX and PyTorch",
      "",
      "Command: `.venv/bin/python benchmarks/per_sample_backends.py "
      f"--repeats={_REPEATS.value} --samples={_SAMPLES.value}`; medians, "
      "the three ways interleaved in each repetition.",
      "",
      "Seconds and ratios by wall clock; in brackets by process CPU time "
      "(all threads), which moves less when other processes share the "
      "cores.",
      "",
      "| backend | model | batched (s) | closed forms (s) | mapped (s) | "
      "closed ÷ batched | mapped ÷ batched | mapped ÷ closed |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]

  def pair(t, way, over=None):
    if over is None:
      return f"{t[way][0]:.3f} ({t[way][1]:.3f})"
    return (f"{t[way][0] / t[over][0]:.2f} "
            f"({t[way][1] / t[over][1]:.2f})")

  for backend, models in results.items():
    for name, t in models.items():
      lines.append(
          f"| {backend} | {name} | {pair(t, 'batched')} | "
          f"{pair(t, 'closed')} | {pair(t, 'mapped')} | "
          f"{pair(t, 'closed', 'batched')} | "
          f"{pair(t, 'mapped', 'batched')} | {pair(t, 'mapped', 'closed')} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _WORKER.value:
    _worker()
    return
  results = {}
  for backend in _ONLY.value:
    if importlib.util.find_spec(backend) is None:
      print(f"{backend}: not installed, skipped")
      continue
    results[backend] = _run_backend(backend)
  report = _report(results)
  print(report)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(report)


if __name__ == "__main__":
  app.run(main)
