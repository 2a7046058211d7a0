r"""MAS state of a KerasHub text classifier, with and without LoRA.

  .venv/bin/python benchmarks/lora_memory.py

For each configuration a BERT classifier is built from a config (random
weights, no download), in a fresh process, optionally with
`backbone.enable_lora(rank)`, then wrapped with `MASModel.from_model`, which
makes Ω and θ* for the trainable variables. Reports the model's parameters,
the trainable ones, the bytes of Ω and θ* (counted from the variables), and
the growth of the process's resident memory from before the wrap to after
Ω and θ* are written, as `consolidate` writes them (`psutil`), so that the
count is checked against what the process really holds.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

_CONFIGS = {
    # The sizes of the published bert_tiny / bert_small presets.
    "bert_tiny": dict(num_layers=2, num_heads=2, hidden_dim=128,
                      intermediate_dim=512),
    "bert_small": dict(num_layers=4, num_heads=8, hidden_dim=512,
                       intermediate_dim=2048),
}
_NAMES = flags.DEFINE_list("configs", list(_CONFIGS), "Configurations.")
_RANK = flags.DEFINE_integer("rank", 4, "LoRA rank.")

_CHILD = r"""
import json, os, sys
import psutil
import keras, keras_hub, numpy as np
import keras_mas
config, rank = json.loads(sys.argv[1]), int(sys.argv[2])
backbone = keras_hub.models.BertBackbone(
    vocabulary_size=30522, max_sequence_length=512, **config)
classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                                 preprocessor=None)
if rank:
  backbone.enable_lora(rank)
count = lambda vs: sum(int(np.prod(v.shape)) for v in vs)
process = psutil.Process()
before = process.memory_info().rss
model = keras_mas.MASModel.from_model(classifier)
# Written as consolidate writes them (zeros alone leave pages untouched).
for v, omega, anchor in model.mas_variables:
  anchor.assign(keras.ops.cast(v, "float32"))
  omega.assign(keras.ops.ones(omega.shape))
after = process.memory_info().rss
state = count(model.importances) + count(model.anchors)
print(json.dumps({"params": count(classifier.weights),
                  "trainable": count(classifier.trainable_variables),
                  "state_mib": state * 4 / 2**20,
                  "rss_growth_mib": (after - before) / 2**20}))
"""


def _measure(config, rank):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  done = subprocess.run(
      [sys.executable, "-c", _CHILD, json.dumps(config), str(rank)],
      capture_output=True, text=True, env=env, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  print("| backbone | LoRA | parameters | trainable | Ω + θ* (counted) | "
        "RSS growth |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for name in _NAMES.value:
    for rank in (0, _RANK.value):
      row = _measure(_CONFIGS[name], rank)
      print(f"| {name} | {f'rank {rank}' if rank else 'none'} | "
            f"{row['params']:,} | {row['trainable']:,} | "
            f"{row['state_mib']:.2f} MiB | {row['rss_growth_mib']:.1f} MiB |")


if __name__ == "__main__":
  app.run(main)
