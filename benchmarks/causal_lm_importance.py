r"""Exact MAS importance on causal language models ÷ one training epoch.

  .venv/bin/python benchmarks/causal_lm_importance.py
  .venv/bin/python benchmarks/causal_lm_importance.py --models=llama3 \
      --output=/tmp/lm.md

For each KerasHub causal LM, built from a config (random weights, no
download; `preprocessor=None`, token ids in), wrapped by `MASModel`: the
median time of one training epoch (`fit`, Adam, the penalty active) and of
one exact importance pass (`consolidate`, per-sample |·|) on the same texts,
at the same batch, interleaved; the batched approximation (`per_sample=False`,
one forward and backward pass, no per-sample work) says how much of the exact
pass is the per-sample work. First calls (tracing) are reported apart.

The texts are windows of real text shipped with Debian (the GPL-3 licence
text, as byte ids), the same windows for training and importance.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import keras_hub
import numpy as np
import tensorflow as tf

import keras_mas
from keras_mas.importance import per_sample

_MODELS = flags.DEFINE_list("models", ["gpt2", "llama3", "gemma3", "qwen3"],
                            "Causal LMs to measure.")
_TEXTS = flags.DEFINE_integer("texts", 128, "Texts (windows) per pass.")
_LENGTH = flags.DEFINE_integer("sequence_length", 128, "Tokens per text.")
_VOCABULARY = flags.DEFINE_integer("vocabulary_size", 8192, "Vocabulary.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch of fit and importance.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions.")
_CORPUS = flags.DEFINE_string("corpus", "/usr/share/common-licenses/GPL-3",
                              "A real text file, read as byte ids.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the report here.")

_SIZE = dict(num_layers=2, hidden_dim=128, intermediate_dim=256)
_GQA = dict(_SIZE, num_query_heads=4, num_key_value_heads=2)


def _causal_lm(name, vocabulary, length):
  keras.utils.set_random_seed(0)
  models = keras_hub.models
  if name == "gpt2":
    backbone = models.GPT2Backbone(vocabulary, num_heads=4,
                                   max_sequence_length=length, **_SIZE)
    return models.GPT2CausalLM(backbone=backbone, preprocessor=None)
  if name == "llama3":
    backbone = models.Llama3Backbone(vocabulary, **_GQA)
    return models.Llama3CausalLM(backbone=backbone, preprocessor=None)
  if name == "gemma3":
    backbone = models.Gemma3Backbone(vocabulary, image_size=16, head_dim=32,
                                     vision_encoder=None, **_GQA)
    return models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
  if name == "qwen3":
    backbone = models.Qwen3Backbone(vocabulary, head_dim=32, **_GQA)
    return models.Qwen3CausalLM(backbone=backbone, preprocessor=None)
  raise ValueError(f"Invalid value for argument `models`. Expected gpt2, "
                   f"llama3, gemma3 or qwen3. Received: {name!r}")


def _texts(path, count, length, vocabulary):
  data = np.frombuffer(open(path, "rb").read(), np.uint8).astype("int32")
  starts = np.arange(count) * length % max(1, len(data) - length - 1)
  ids = np.stack([data[s:s + length + 1] for s in starts]) % vocabulary
  mask = np.ones((count, length), bool)
  return {"token_ids": ids[:, :-1], "padding_mask": mask}, ids[:, 1:], mask


def _seconds(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(name):
  """First-call and median seconds of an epoch and of importance passes."""
  lm = _causal_lm(name, _VOCABULARY.value, _LENGTH.value)
  model = keras_mas.MASModel.from_model(lm)
  model.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                weighted_metrics=[])
  x, y, mask = _texts(_CORPUS.value, _TEXTS.value, _LENGTH.value,
                      _VOCABULARY.value)
  batch = _BATCH.value
  train = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(batch)
  inputs = tf.data.Dataset.from_tensor_slices(x).batch(batch)
  passes = {
      "epoch": lambda: model.fit(train, epochs=1, verbose=0),
      "exact": lambda: model.consolidate(inputs),
      "batched": lambda: model.consolidate(inputs, per_sample=False),
  }
  first = {k: _seconds(f) for k, f in passes.items()}
  times = {k: [] for k in passes}
  for _ in range(_REPEATS.value):
    for k, f in passes.items():
      times[k].append(_seconds(f))
  units = per_sample.plan(model, model.trainable_variables)
  loops = sorted({type(u.layer).__name__ for u in units
                  if isinstance(u, per_sample.Fallback) and u.layer})
  return {"model": name, "params": model.count_params(),
          "first": first, "median": {k: statistics.median(v)
                                     for k, v in times.items()},
          "loops": loops}


def report(rows):
  lines = [
      f"Exact importance ÷ one training epoch, {_TEXTS.value} texts of "
      f"{_LENGTH.value} tokens (vocabulary {_VOCABULARY.value}), batch "
      f"{_BATCH.value}, median of {_REPEATS.value}; target ≤ 0.5.", "",
      "| model | parameters | epoch (s) | exact (s) | batched (s) | exact ÷ "
      "epoch | batched ÷ epoch | first calls: epoch / exact (s) | layers "
      "re-run per sample |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in rows:
    m, f = r["median"], r["first"]
    lines.append(
        f"| {r['model']} | {r['params']:,} | {m['epoch']:.2f} | "
        f"{m['exact']:.2f} | {m['batched']:.2f} | "
        f"{m['exact'] / m['epoch']:.2f} | {m['batched'] / m['epoch']:.2f} | "
        f"{f['epoch']:.1f} / {f['exact']:.1f} | "
        f"{', '.join(r['loops']) or 'none'} |")
  return "\n".join(lines)


def main(argv):
  del argv
  text = report([measure(name) for name in _MODELS.value])
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
