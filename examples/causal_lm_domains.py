r"""A causal language model learns a second text domain, with MAS or without.

  .venv/bin/python examples/causal_lm_domains.py

A GPT-2 `CausalLM` built from a config (2 layers, width 32, characters as
tokens, random weights; no download) learns domain A (sentences about cats)
from raw strings, MAS measures Ω on A's strings (the squared norm of the
logits of the real tokens, summed), then the model learns domain B (stock
market sentences) from the same starting point at each λ. Prints A's and
B's next-token loss after B, and a generation from A's prompt.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import keras
import keras_hub
import numpy as np

import keras_mas

DOMAIN_A = np.array(["the cat sat on the mat", "a cat ran to the mat",
                     "the cat is on a mat", "my cat sat"] * 8)
DOMAIN_B = np.array(["buy stock now", "sell the market", "stock market up",
                     "buy low sell high"] * 8)


def causal_lm():
  keras.utils.set_random_seed(0)
  vocabulary = {"<|endoftext|>": 0}
  for prefix in ("", "Ġ"):
    for c in "abcdefghijklmnopqrstuvwxyz":
      vocabulary[prefix + c] = len(vocabulary)
  vocabulary["Ġ"] = len(vocabulary)
  tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary,
                                             merges=["Ġ c"])
  backbone = keras_hub.models.GPT2Backbone(
      vocabulary_size=len(vocabulary), num_layers=2, num_heads=2,
      hidden_dim=32, intermediate_dim=64, max_sequence_length=16)
  return keras_hub.models.GPT2CausalLM(
      backbone, preprocessor=keras_hub.models.GPT2CausalLMPreprocessor(
          tokenizer, sequence_length=16))


def main():
  lm = causal_lm()
  model = keras_mas.MASModel.from_model(lm)
  model.compile(keras.optimizers.Adam(3e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                weighted_metrics=[])
  model.fit(DOMAIN_A, epochs=10, batch_size=8, verbose=0)
  model.consolidate(DOMAIN_A)  # Ω on A's raw strings.
  loss = lambda data: model.evaluate(data, verbose=0,
                                     return_dict=True)["task_loss"]
  print(f"after A: loss on A {loss(DOMAIN_A):.3f}, on B {loss(DOMAIN_B):.3f}")
  with tempfile.TemporaryDirectory() as folder:
    trained = os.path.join(folder, "a.weights.h5")
    model.save_weights(trained)
    print("| λ | loss on A after B | loss on B after B |")
    print("| ---: | ---: | ---: |")
    for strength in (0.0, 0.1, 0.3, 1.0):
      model.load_weights(trained)
      model.strength = strength
      model.reset_optimizer()
      model.fit(DOMAIN_B, epochs=5, batch_size=8, verbose=0)
      print(f"| {strength:g} | {loss(DOMAIN_A):.3f} | {loss(DOMAIN_B):.3f} |")
  print("generate('the cat'):", repr(lm.generate("the cat", max_length=16)))


if __name__ == "__main__":
  main()
