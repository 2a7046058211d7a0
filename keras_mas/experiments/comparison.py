"""Compare methods × seeds on one task sequence, with a fair choice of λ.

The protocol never looks at test data: for each method with a coefficient,
every value of its grid is tried on a *validation* version of the sequence
(each task's training data split 80/20, the 20% standing in for its test
set, seed 0), and the value with the best validation ACC is kept. Each
method then runs with its chosen value on the real sequence, once per seed.
"""

import csv
import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from keras_mas.core import callbacks
from keras_mas.experiments import sequential as training

__all__ = ["GRIDS", "compare", "select_strength", "validation_sequence"]

# Each method's coefficient and the grid it is chosen from. The scales
# differ because the importances do: MAS sums output norms, the Fisher of a
# trained classifier is small, L2 weighs every parameter equally.
GRIDS = {
    "mas": ("strength", (0.1, 1.0, 10.0)),
    "local_mas": ("strength", (0.1, 1.0, 10.0)),
    "l2": ("strength", (0.01, 0.1, 1.0)),
    "ewc": ("strength", (100.0, 1000.0, 10000.0)),
    "online_ewc": ("strength", (100.0, 1000.0, 10000.0)),
    "si": ("strength", (1.0, 10.0, 100.0)),
    "lwf": ("temperature", (2.0, 4.0, 8.0)),
}
_VALIDATION_FRACTION = 0.2


def validation_sequence(sequence):
  """A copy of `sequence` whose test sets are held-out training data."""
  held_out = []
  for task in sequence.tasks:
    n_val = max(1, int(len(task.x_train) * _VALIDATION_FRACTION))
    held_out.append(dataclasses.replace(
        task, x_train=task.x_train[n_val:], y_train=task.y_train[n_val:],
        x_test=task.x_train[:n_val], y_test=task.y_train[:n_val]))
  return dataclasses.replace(sequence, tasks=held_out)


def select_strength(sequence, workdir, method="mas", grid=None, model="mlp",
                    verbose=0, **run_options):
  """Picks a method's coefficient (λ) on held-out training data.

  Every value of `grid` trains the whole sequence on its validation version
  (each task's training data split 80/20, see `validation_sequence`; no
  test sample is read), and the value with the best validation ACC wins
  (ties: the first in `grid`). Works for the user's own model and tasks:
  pass a built `keras.Model` as `model` (each run starts from a copy of
  it) and a `TaskSequence` of any data (e.g. `tasks.from_arrays`).

  λ has no universal value because Ω has no fixed scale: MAS importance is
  the gradient of the squared output norm, `2·F·∂F/∂θ`, so it grows with
  the logits' size, the number of outputs and the data; the penalty
  `λ Σ Ω (θ − θ*)²` must be weighed against the task loss for each model
  and sequence. Choose on held-out data, over a grid spanning decades.

  Example:

  ```python
  sequence = keras_mas.data.tasks.make_sequence("digits", "permuted", "domain", 3)
  choice = keras_mas.experiments.comparison.select_strength(
      sequence, "/tmp/select", grid=(0.01, 0.1, 1.0), epochs=2)
  results = keras_mas.experiments.sequential.run_sequence(
      sequence, "/tmp/run", strength=choice["value"], epochs=2)
  ```

  Args:
    sequence: a `TaskSequence`.
    workdir: directory for the trial runs (one subdirectory per value).
    method: a method with a coefficient (a key of `GRIDS`): `lwf` chooses
      its temperature, the others their strength.
    grid: the values to try; `GRIDS[method]` if None.
    model: an architecture name or the user's built `keras.Model`.
    verbose: 0 silent, 1 a line per value.
    **run_options: other `training.run_sequence` arguments (epochs,
      learning_rate, ...); `seed` defaults to 0.

  Returns:
    A dict: `coefficient` (its name), `value` (the best),
    `validation_acc` (value as text → validation ACC, None for a value whose
    training diverged).

  Raises:
    ValueError: for a method without a coefficient, an empty grid, or any
      argument `run_sequence` refuses (before any training).
    keras_mas.core.callbacks.TrainingDivergedError: if every value diverged.
  """
  if method not in GRIDS:
    raise ValueError(
        "Invalid value for argument `method`. Expected a method with a "
        f"coefficient, one of {sorted(GRIDS)}. Received: method={method!r}")
  name, default = GRIDS[method]
  grid = tuple(default if grid is None else grid)
  if not grid:
    raise ValueError(
        "Invalid value for argument `grid`. Expected at least one value. "
        f"Received: grid={grid!r}")
  run_options = {"seed": 0, **run_options, "verbose": 0}
  validation = validation_sequence(sequence)
  scores = {}
  for value in grid:
    try:
      result = training.run_sequence(
          validation, os.path.join(workdir, method, f"{name}_{value:g}"),
          method=method, model=model, **{**run_options, name: value})
      scores[value] = result["acc"]
    except callbacks.TrainingDivergedError:
      scores[value] = None  # Too strong for a gradient step: not a choice.
    if verbose:
      print(f"{method} {name}={value:g}: validation ACC "
            + ("diverged" if scores[value] is None
               else f"{scores[value]:.3f}"), flush=True)
  finished = [v for v in grid if scores[v] is not None]
  if not finished:
    raise callbacks.TrainingDivergedError(
        f"Every value of {name} in {list(grid)} diverged; try smaller values "
        "or penalty_mode='proximal'.")
  best = max(finished, key=lambda v: scores[v])
  return {"coefficient": name, "value": best,
          "validation_acc": {f"{v:g}": scores[v] for v in grid}}


def compare(sequence, workdir, methods, seeds=(0, 1, 2), run_options=None,
            verbose=1):
  """Runs every method on every seed; writes tables, plots and HParams.

  Args:
    sequence: a `TaskSequence`.
    workdir: output directory: `comparison.md`, `comparison.csv`,
      `acc_per_task.png`, `accuracy_matrices.png`, `choices.json`, and
      TensorBoard HParams under `hparams/`.
    methods: method names (see `keras_mas.experiments.methods`).
    seeds: seeds of the final runs.
    run_options: other `run_sequence` arguments (epochs, model, ...).
    verbose: 0 silent, 1 a line per run.

  Returns:
    A dict: method → chosen coefficient and per-seed results.

  Raises:
    ValueError: for an unknown method or empty `methods`/`seeds`.
  """
  if not methods or not seeds:
    raise ValueError(
        "Invalid value for argument `methods`/`seeds`. Expected at least "
        f"one of each. Received: methods={methods!r}, seeds={seeds!r}")
  for method in methods:
    if method not in training.METHODS:
      raise ValueError(
          f"Invalid value for argument `methods`. Expected names from "
          f"{training.METHODS}. Received: {method!r}")
  run_options = dict(run_options or {})
  run_options["verbose"] = 0
  os.makedirs(workdir, exist_ok=True)

  outcome = {}
  for method in methods:
    options = dict(run_options)
    choice = {}
    if method in GRIDS:
      choice = select_strength(sequence, os.path.join(workdir, "selection"),
                               method=method, **options)
      options[choice["coefficient"]] = choice["value"]
    runs = []
    for seed in seeds:
      started = time.perf_counter()
      result = training.run_sequence(
          sequence, os.path.join(workdir, "runs", method, f"seed_{seed}"),
          method=method, seed=seed, **options)
      result["seconds"] = time.perf_counter() - started
      runs.append(result)
      if verbose:
        print(f"{method:10s} seed {seed}: ACC {result['acc']:.3f} "
              f"forgetting {result['forgetting']:.3f} "
              f"({result['seconds']:.0f}s)", flush=True)
    outcome[method] = {"choice": choice, "runs": runs}

  _write_tables(outcome, sequence, workdir)
  _write_plots(outcome, workdir)
  _write_hparams(outcome, workdir)
  with open(os.path.join(workdir, "choices.json"), "w") as f:
    json.dump({m: o["choice"] for m, o in outcome.items()}, f, indent=1)
  return outcome


def _summary(runs, key):
  values = np.array([r[key] for r in runs])
  return values.mean(), values.std()


def _write_tables(outcome, sequence, workdir):
  with open(os.path.join(workdir, "comparison.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "seed", "coefficient", "value", "acc", "bwt",
                     "fwt", "forgetting", "seconds"])
    for method, o in outcome.items():
      for r in o["runs"]:
        writer.writerow([method, r["config"]["seed"],
                         o["choice"].get("coefficient", ""),
                         o["choice"].get("value", ""), f"{r['acc']:.4f}",
                         f"{r['bwt']:.4f}", f"{r['fwt']:.4f}",
                         f"{r['forgetting']:.4f}", f"{r['seconds']:.1f}"])
  seeds = len(next(iter(outcome.values()))["runs"])
  lines = [
      f"{sequence.dataset}, {sequence.recipe}, "
      f"{sequence.scenario}-incremental, {len(sequence)} tasks; mean ± std "
      f"over {seeds} seeds", "",
      "| method | chosen | ACC | BWT | forgetting | time per run (s) |",
      "| --- | --- | ---: | ---: | ---: | ---: |"]
  for method, o in outcome.items():
    c = o["choice"]
    chosen = f"{c['coefficient']} {c['value']:g}" if c else "—"
    cells = [f"{m:.3f} ± {s:.3f}" for m, s in (
        _summary(o["runs"], "acc"), _summary(o["runs"], "bwt"),
        _summary(o["runs"], "forgetting"))]
    lines.append(f"| {method} | {chosen} | " + " | ".join(cells)
                 + f" | {_summary(o['runs'], 'seconds')[0]:.0f} |")
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _write_plots(outcome, workdir):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(7, 4.5))
  for method, o in outcome.items():
    curves = []
    for r in o["runs"]:
      m = np.array(r["accuracy_matrix"])
      curves.append([m[k, :k + 1].mean() for k in range(len(m))])
    curves = np.array(curves)
    steps = np.arange(1, curves.shape[1] + 1)
    axes.plot(steps, curves.mean(0), marker="o", label=method)
    axes.fill_between(steps, curves.mean(0) - curves.std(0),
                      curves.mean(0) + curves.std(0), alpha=0.15)
  axes.set_xticks(steps)
  axes.set_xlabel("tasks learned")
  axes.set_ylabel("mean accuracy on tasks so far")
  axes.set_ylim(0, 1)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8, ncol=2)
  figure.tight_layout()
  figure.savefig(os.path.join(workdir, "acc_per_task.png"), dpi=100)
  plt.close(figure)

  names = list(outcome)
  cols = min(3, len(names))
  rows = int(np.ceil(len(names) / cols))
  figure, grid = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows),
                              squeeze=False)
  for ax, method in zip(grid.ravel(), names):
    m = np.mean([r["accuracy_matrix"] for r in outcome[method]["runs"]], 0)
    ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(m)):
      for j in range(len(m)):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                color="white" if m[i, j] < 0.6 else "black")
    ax.set_title(method, fontsize=9)
    ax.set_xlabel("on task j", fontsize=7)
    ax.set_ylabel("after task i", fontsize=7)
    ax.set_xticks(range(len(m)))
    ax.set_yticks(range(len(m)))
    ax.tick_params(labelsize=6)
  for ax in grid.ravel()[len(names):]:
    ax.axis("off")
  figure.tight_layout()
  figure.savefig(os.path.join(workdir, "accuracy_matrices.png"), dpi=100)
  plt.close(figure)


def _write_hparams(outcome, workdir):
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  for method, o in outcome.items():
    for r in o["runs"]:
      logdir = os.path.join(workdir, "hparams",
                            f"{method}_seed{r['config']['seed']}")
      with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams({
            "method": method, "seed": r["config"]["seed"],
            "strength": r["config"]["strength"],
            "temperature": r["config"]["temperature"],
        }, trial_id=f"{method}_seed{r['config']['seed']}")
        for key in ("acc", "bwt", "fwt", "forgetting"):
          tf.summary.scalar(f"sequence/{key}", r[key], step=1)
