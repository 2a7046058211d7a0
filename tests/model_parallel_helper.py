"""Runs MAS under `ModelParallel` on 8 CPU devices; prints one JSON line.

Run by tests/model_parallel_test.py in a subprocess (the device count and
the backend are fixed at JAX's import):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
    python tests/model_parallel_helper.py causal_lm /tmp/work 0,1

(the model, a working directory, and 0 without LoRA, 1 with, or both).

For the single-device model and then each mesh: the model built from the
same seed, `consolidate` on token ids, two steps of `fit`, and (per mesh)
a `.keras` round trip under the same distribution; the JSON holds the
largest differences from the single-device run and the layouts that
differ from their variable's.
"""

import json
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import keras_hub
import keras_mas
from keras_mas.core import model_parallel

MESHES = ((8, 1), (2, 4), (1, 8))
_TOKENS, _SAMPLES = 16, 16


def _build(kind, lora):
  keras.utils.set_random_seed(0)
  hub = keras_hub.models
  if kind == "causal_lm":
    backbone = hub.GemmaBackbone(
        vocabulary_size=256, num_layers=2, num_query_heads=8,
        num_key_value_heads=8, hidden_dim=64, intermediate_dim=128,
        head_dim=8)
    model = hub.GemmaCausalLM(backbone, preprocessor=None)
  else:
    backbone = hub.BertBackbone(
        vocabulary_size=256, num_layers=2, num_heads=8, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=_TOKENS, dropout=0.0)
    # No dropout: its masks are drawn per device under a distribution.
    model = hub.BertTextClassifier(backbone, num_classes=4,
                                   preprocessor=None, dropout=0.0)
  if lora:
    backbone.enable_lora(2)
  return model


def _data(kind):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (_SAMPLES, _TOKENS)).astype("int32")
  mask = np.ones_like(tokens)
  if kind == "causal_lm":
    return ({"token_ids": tokens, "padding_mask": mask},
            np.roll(tokens, -1, axis=1))
  return ({"token_ids": tokens, "segment_ids": np.zeros_like(tokens),
           "padding_mask": mask}, rng.integers(0, 4, _SAMPLES))


def _run(kind, lora, workdir=None):
  """`(net, Ω after consolidate, weights after fit, Ω after a .keras round
  trip or None)` under the distribution in effect."""
  x, y = _data(kind)
  net = keras_mas.MASModel.from_model(_build(kind, lora))
  net.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True))
  net.consolidate(x, strength=0.1)
  omega = [keras.ops.convert_to_numpy(o.value) for o in net._mas.importances]  # pylint: disable=protected-access
  net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
  weights = [keras.ops.convert_to_numpy(v.value)
             for v in net.trainable_variables]
  loaded = None
  if workdir is not None:
    path = os.path.join(workdir, f"{kind}_{lora}.keras")
    net.save(path)
    loaded = keras.models.load_model(path)
  return net, omega, weights, loaded


def _differing_layouts(net):
  mas = net._mas  # pylint: disable=protected-access
  return [v.path for v, o, a in zip(mas.targets, mas.importances,
                                    mas.anchors)
          if not (v.value.sharding.spec == o.value.sharding.spec
                  == a.value.sharding.spec)]


def _largest(a, b):
  """The largest difference of `b` from `a`, relative to each tensor's
  scale, but at least a thousandth of the largest tensor's: a key bias's
  true Ω is 0 (softmax ignores it), and its round-off has no scale."""
  floor = 1e-3 * max(float(np.max(np.abs(p))) for p in a)
  return max(float(np.max(np.abs(p - q)) / max(np.max(np.abs(p)), floor,
                                                1e-30))
             for p, q in zip(a, b))


def main(kind, workdir, loras, meshes=MESHES):
  report = {}
  for lora in loras:
    keras.distribution.set_distribution(None)
    _, omega_1, weights_1, _ = _run(kind, lora)
    for shape in meshes:
      layout_map = (model_parallel.layout_map_of(keras_hub.models.GemmaBackbone)
                    if kind == "causal_lm" else None)
      keras.distribution.set_distribution(
          model_parallel.make_distribution(shape, layout_map=layout_map))
      net, omega, weights, loaded = _run(kind, lora, workdir)
      sharded = sum(any(a is not None for a in v.value.sharding.spec)
                    for v in net._mas.importances)  # pylint: disable=protected-access
      report[f"{shape[0]}x{shape[1]}{'_lora' if lora else ''}"] = {
          "omega": _largest(omega_1, omega),
          "weights": _largest(weights_1, weights),
          "differing_layouts": _differing_layouts(net),
          "loaded_differing_layouts": _differing_layouts(loaded),
          "loaded_state": _largest(
              [keras.ops.convert_to_numpy(v.value)
               for v in net._mas.importances + net._mas.anchors],  # pylint: disable=protected-access
              [keras.ops.convert_to_numpy(v.value)
               for v in loaded._mas.importances + loaded._mas.anchors]),  # pylint: disable=protected-access
          "sharded_state": int(sharded),
          "state": len(net._mas.importances),  # pylint: disable=protected-access
          "bytes": model_parallel.per_device_bytes(net),
      }
  print(json.dumps(report))


if __name__ == "__main__":
  # argv: kind, workdir, LoRA settings ("0,1"), then optionally the meshes
  # ("2x4,1x8"; all of MESHES by default).
  main(sys.argv[1], sys.argv[2],
       [bool(int(v)) for v in sys.argv[3].split(",")],
       [tuple(int(n) for n in m.split("x")) for m in sys.argv[4].split(",")]
       if len(sys.argv) > 4 else MESHES)
