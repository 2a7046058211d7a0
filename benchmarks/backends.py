r"""MAS's costs on each installed Keras backend, side by side.

  .venv/bin/python benchmarks/backends.py --repeats=5

For every backend that imports (TensorFlow; JAX with `pip install -e .[jax]`)
a subprocess with `KERAS_BACKEND` set times, on the same MLP (the main job's:
64 → 128 → 128 → 10, batch 32, 2,048 samples of 8×8 inputs):

* MAS `fit` ÷ plain Keras `fit`: an epoch of a consolidated `MASModel`
  (penalty on) against an epoch of the same `keras.Model`;
* importance ÷ one epoch: exact per-sample `importance.mas` over the 2,048
  samples (compiled already) against one plain epoch;
* first call: the seconds the first MAS epoch and the first importance pass
  take beyond their steady time (tracing and compiling);
* with `--sequence`, the Fashion-MNIST split sequence (5 tasks, MLP
  784 → 256 → 256, SGD at 0.01, batch 128, 2 epochs a task, MAS):
  the whole `run_sequence` call's seconds and its ACC.

Epochs of the two models are interleaved and each is traced first; the
medians over the repetitions are printed. Ratios, not seconds, are
comparable across backends; timings move when other processes share the
cores.
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
_SEQUENCE = flags.DEFINE_bool(
    "sequence", False, "Also time the Fashion-MNIST split sequence.")
_ONLY = flags.DEFINE_list("backends", None, "Only these backends.")
_WORKER = flags.DEFINE_string(
    "worker", None, "Internal: time on this process's backend, print JSON.")

_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax"}


def _sequence():
  """Seconds and ACC of MAS on the Fashion-MNIST split sequence."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from keras_mas.data import tasks  # pylint: disable=g-import-not-at-top
  from keras_mas.experiments import sequential  # pylint: disable=g-import-not-at-top
  sequence = tasks.make_sequence("fashion_mnist", "split", "domain", 5)
  start = time.perf_counter()
  results = sequential.run_sequence(
      sequence, tempfile.mkdtemp(prefix="keras_mas_backends_"), method="mas",
      epochs=2, batch_size=128, hidden_units=256, optimizer="sgd",
      learning_rate=0.01, verbose=0)
  return time.perf_counter() - start, results["acc"]


def _measure(repeats, sequence):
  """Times this process's backend; returns the medians in seconds."""
  sys.path.insert(0, _ROOT)
  # pylint: disable=g-import-not-at-top
  import keras
  import numpy as np

  import keras_mas

  rng = np.random.default_rng(0)
  x = rng.normal(size=(2048, 64)).astype("float32")
  y = rng.integers(0, 10, size=2048)

  def build(cls):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu")(inputs)
    h = keras.layers.Dense(128, activation="relu")(h)
    model = cls(inputs, keras.layers.Dense(10)(h))
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model

  plain, mas = build(keras.Model), build(keras_mas.MASModel)
  first = {}
  for key, model in (("plain", plain), ("mas", mas)):  # Traced.
    start = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    first[key] = time.perf_counter() - start
  start = time.perf_counter()
  mas.consolidate(x, strength=0.1)  # The importance pass compiled.
  first["importance"] = time.perf_counter() - start
  mas.fit(x, y, epochs=1, batch_size=32, verbose=0)  # Traced again (Ω > 0).
  times = {"plain": [], "mas": [], "importance": []}
  for _ in range(repeats):
    for key, model in (("plain", plain), ("mas", mas)):
      start = time.perf_counter()
      model.fit(x, y, epochs=1, batch_size=32, verbose=0)
      times[key].append(time.perf_counter() - start)
    start = time.perf_counter()
    keras_mas.importance.mas(mas, x)
    times["importance"].append(time.perf_counter() - start)
  medians = {k: statistics.median(v) for k, v in times.items()}
  medians.update({f"first_{k}": first[k] - medians[k] for k in first})
  if sequence:
    medians["sequence"], medians["sequence_acc"] = _sequence()
  return medians


def _installed(backend):
  return importlib.util.find_spec(_BACKENDS[backend]) is not None


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_measure(_REPEATS.value, _SEQUENCE.value)))
    return
  print("| backend | plain epoch (s) | MAS epoch (s) | MAS fit ÷ plain fit | "
        "importance (s) | importance ÷ one epoch | first MAS epoch, "
        "beyond steady (s) | first importance, beyond steady (s) | "
        "Fashion-MNIST split sequence (s, ACC) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for backend in _ONLY.value or _BACKENDS:
    if not _installed(backend):
      print(f"| {backend} | not installed | | | | | | | |")
      continue
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--worker={backend}",
         f"--repeats={_REPEATS.value}", f"--sequence={_SEQUENCE.value}"],
        env=env, capture_output=True, text=True, check=False)
    if done.returncode:
      print(f"| {backend} | failed: {done.stderr.strip()[-200:]} | | | | |")
      continue
    t = json.loads(done.stdout.strip().splitlines()[-1])
    sequence = (f"{t['sequence']:.1f} s, {t['sequence_acc']:.3f}"
                if "sequence" in t else "—")
    print(f"| {backend} | {t['plain']:.3f} | {t['mas']:.3f} | "
          f"{t['mas'] / t['plain']:.2f} | {t['importance']:.3f} | "
          f"{t['importance'] / t['plain']:.2f} | {t['first_mas']:.2f} | "
          f"{t['first_importance']:.2f} | {sequence} |", flush=True)


if __name__ == "__main__":
  app.run(main)
