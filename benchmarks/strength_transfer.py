r"""Does one λ suit every model? The best λ of MAS per model and normalization.

  .venv/bin/python benchmarks/strength_transfer.py
  .venv/bin/python benchmarks/strength_transfer.py --models=mlp \
      --normalizations=none,mean --output=/tmp/lambda.md

For three models whose Ω differ in scale by orders of magnitude, MAS runs
over a grid of λ with Ω as measured (`none`, the paper) and with each
task's Ω divided by its mean (`mean`) or by its largest entry (`max`) over
the protected weights (`MASModel.consolidate(normalize=...)`):

* `mlp`: the main job's MLP on permuted digits (bundled; 3 tasks, 5
  epochs each, domain-incremental);
* `cnn`: the `cnn` on Fashion-MNIST split into 5 tasks of 2 classes
  (domain-incremental: one head of 2 outputs that every task reuses, so
  that forgetting is the problem; 1,000 training images per task from
  Debian's `dataset-fashion-mnist`, 3 epochs each);
* `lm`: a GPT-2 causal LM from a config (1 layer, width 16, byte tokens)
  trained 30 epochs on a license text (GPL-3, Debian's) and saved as a
  preset: the deployed model. The run adapts it to Debian package
  changelogs (3 epochs, full fine-tuning), with Ω measured on the license
  text first (`importance_corpus`), as the app's `--importance_data` does.

Score: the classifiers' final average accuracy (ACC); the LM's mean
next-token loss over both corpora after the adaptation (lower is better),
with the old corpus's loss rise and the new one's gain. Writes a Markdown table (best λ per model and
normalization, and each model's score at every λ) to --output.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # language_models
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from keras_mas.data import corpora
from keras_mas.data import sources
from keras_mas.data import tasks
from keras_mas.experiments import language
from keras_mas.experiments import sequential

_MODELS = flags.DEFINE_list("models", ["mlp", "cnn", "lm"], "Models.")
_NORMALIZATIONS = flags.DEFINE_list(
    "normalizations", ["none", "mean", "max"], "Ω normalizations.")
_STRENGTHS = flags.DEFINE_list(
    "strengths", ["0.001", "0.01", "0.1", "1", "10", "100", "1000"], "λ grid.")
_OUTPUT = flags.DEFINE_string("output", "/tmp/strength_transfer.md",
                              "Markdown report.")


def _digits():
  return tasks.make_sequence("digits", "permuted", "domain", 3, seed=0)


def _fashion_mnist():
  x, y, x_test, y_test = sources.load("fashion_mnist")
  parts = []
  for k in range(5):
    pick = lambda labels, n: np.flatnonzero(
        (labels == 2 * k) | (labels == 2 * k + 1))[:n]
    train, test = pick(y, 1000), pick(y_test, 400)
    parts.append((x[train], y[train] - 2 * k, x_test[test],
                  y_test[test] - 2 * k))
  return tasks.from_arrays(parts, scenario="domain", dataset="fashion_mnist")


def _classifier(model, sequence, epochs, normalize, strength, workdir):
  method = "finetune" if strength is None else "mas"
  results = sequential.run_sequence(
      sequence, workdir, method=method, strength=strength or 0.0,
      epochs=epochs, model=model, seed=0, verbose=0,
      normalize_importance=normalize)
  return {"score": results["acc"], "forgetting": results["forgetting"]}


def _language(old, new, preset, normalize, strength, workdir):
  method = "finetune" if strength is None else "mas"
  run = language.LanguageRun(
      corpora=(new,), method=method, strength=strength or 0.0,
      epochs=3, batch_size=8, learning_rate=3e-3, generate_length=0,
      normalize_importance=normalize, checkpoint_seconds=1e9)
  results = language.run_corpora(run, sources.load_model(preset), workdir,
                                 importance_corpus=old, verbose=0)
  before, after = (results["importance_data_loss"][0],
                   results["importance_data_loss"][-1])
  new_loss = results["loss_matrix"][-1][0]
  return {"score": float((after + new_loss) / 2),
          "old_rise": float(after - before),
          "new_gain": float(results["gain"][0])}


def _runners(folder):
  import language_models  # pylint: disable=g-import-not-at-top
  runners = {}
  if "mlp" in _MODELS.value:
    digits = _digits()
    runners["mlp"] = lambda n, s, w: _classifier("mlp", digits, 5, n, s, w)
  if "cnn" in _MODELS.value:
    fashion = _fashion_mnist()
    runners["cnn"] = lambda n, s, w: _classifier("cnn", fashion, 3, n, s, w)
  if "lm" in _MODELS.value:
    old = language_models.write_corpus(
        os.path.join(folder, "licenses"),
        language_models.license_text(chars=12000))
    new = language_models.write_corpus(
        os.path.join(folder, "changelogs"),
        language_models.changelog_text(chars=12000))
    texts = corpora.load_corpus(old, passage_words=36)
    preset = language_models.save_preset(
        "gpt2", os.path.join(folder, "gpt2"), sequence_length=48,
        trained_on=texts.train, epochs=30)
    runners["lm"] = lambda n, s, w: _language(old, new, preset, n, s, w)
  return runners


def main(argv):
  del argv
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    for name, runner in _runners(folder).items():
      started = time.perf_counter()
      baseline = runner(None, None, os.path.join(folder, f"{name}_ft"))
      rows.append({"model": name, "normalize": "finetune", "strength": 0,
                   **baseline})
      print(json.dumps(rows[-1]), flush=True)
      for normalize in _NORMALIZATIONS.value:
        for strength in _STRENGTHS.value:
          workdir = os.path.join(folder, f"{name}_{normalize}_{strength}")
          result = runner(None if normalize == "none" else normalize,
                          float(strength), workdir)
          rows.append({"model": name, "normalize": normalize,
                       "strength": float(strength), **result})
          print(json.dumps(rows[-1]), flush=True)
      print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
  with open(_OUTPUT.value, "w", encoding="utf-8") as f:
    f.write(_report(rows))
  with open(os.path.splitext(_OUTPUT.value)[0] + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  print(_report(rows))


def _report(rows):
  """Best λ per model and normalization, then every score."""
  lines = ["| model | Ω | best λ | score at best | score per λ |",
           "| --- | --- | ---: | ---: | --- |"]
  for model in dict.fromkeys(r["model"] for r in rows):
    lower = model == "lm"  # A loss: lower is better.
    for normalize in dict.fromkeys(r["normalize"] for r in rows
                                   if r["model"] == model):
      runs = [r for r in rows if r["model"] == model
              and r["normalize"] == normalize]
      best = (min if lower else max)(runs, key=lambda r: r["score"])
      lines.append(
          f"| {model} | {normalize} | {best['strength']:g} | "
          f"{best['score']:.3f} | "
          + " ".join(f"{r['strength']:g}: {r['score']:.3f}" for r in runs)
          + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
