r"""MAS `fit` ÷ plain Keras `fit` on benchmarks/run.py's shapes, wall and CPU.

  .venv/bin/python benchmarks/fit_penalty.py --repeats=5

Besides `run.py`'s wall-clock ratio, prints the ratio of process CPU time
(all threads), which moves less when other processes share the cores, and
the cost of `fit`'s divergence guard (`stop_on_divergence`) on its own, and
`penalty_log_interval=8` (the penalty's value on every 8th step only).
Epochs of the models are interleaved; medians over the repetitions.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras

import run  # The shapes, data and models of benchmarks/run.py.

_REPEATS = flags.DEFINE_integer("fit_repeats", 5, "Timed repetitions.")
_SHAPES = flags.DEFINE_list(
    "shapes", ["mlp:32", "mlp:128", "cnn:32", "mlp-2m:32", "mlp-2m:256"],
    "model:batch pairs.")


class _Timer(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.wall, self.cpu = [], []

  def on_epoch_begin(self, epoch, logs=None):
    self._wall, self._cpu = time.perf_counter(), time.process_time()

  def on_epoch_end(self, epoch, logs=None):
    self.wall.append(time.perf_counter() - self._wall)
    self.cpu.append(time.process_time() - self._cpu)


def bench(name, batch_size, repeats):
  x, y = run._digits()  # pylint: disable=protected-access
  models = {"plain": run._model(name, False)}  # pylint: disable=protected-access
  for key, guard, interval in (("mas", True, 1), ("mas_unguarded", False, 1),
                               ("mas_interval_8", True, 8)):
    model = run._model(name, True)  # pylint: disable=protected-access
    model.fit(x, y, epochs=1, verbose=0)
    model.consolidate(x[:256], strength=0.1)
    model.stop_on_divergence = guard
    model.penalty_log_interval = interval
    models[key] = model
  timers = {key: _Timer() for key in models}
  for model in models.values():  # Trace.
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)
  for _ in range(repeats):
    for key, model in models.items():
      model.fit(x, y, epochs=2, batch_size=batch_size, verbose=0,
                callbacks=[timers[key]])
  wall = {k: statistics.median(t.wall) for k, t in timers.items()}
  cpu = {k: statistics.median(t.cpu) for k, t in timers.items()}
  return wall, cpu


def main(argv):
  del argv
  print("| model | batch | plain epoch (s) | MAS epoch (s) | wall ratio | "
        "CPU ratio | unguarded: wall | CPU | interval 8: wall | CPU |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: |")
  for shape in _SHAPES.value:
    name, batch = shape.split(":")
    wall, cpu = bench(name, int(batch), _REPEATS.value)
    print(f"| {name} | {batch} | {wall['plain']:.4f} | {wall['mas']:.4f} | "
          f"{wall['mas'] / wall['plain']:.3f} | {cpu['mas'] / cpu['plain']:.3f}"
          f" | {wall['mas_unguarded'] / wall['plain']:.3f} | "
          f"{cpu['mas_unguarded'] / cpu['plain']:.3f} | "
          f"{wall['mas_interval_8'] / wall['plain']:.3f} | "
          f"{cpu['mas_interval_8'] / cpu['plain']:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
