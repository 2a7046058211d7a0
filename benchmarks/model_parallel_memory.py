"""Per-device memory of MAS under Keras's ModelParallel, measured and on paper.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
    .venv/bin/python benchmarks/model_parallel_memory.py \
    [--output=benchmarks/MODEL_PARALLEL.md]

Measured: a Gemma causal LM built from a config (Gemma's own layout map)
on 8 CPU devices, for each mesh (8,1), (2,4), (1,8), with and without
LoRA: the bytes on one device of the weights, Adam's state and MAS's (Ω
and θ*), after `consolidate` and one step of `fit`. On paper: the same
arithmetic for published decoder sizes, full fine-tuning and LoRA rank 16,
on 8 and 64 devices, each state sharded over every device (as Gemma's and
Llama's layout maps shard the kernels over both mesh axes).
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

_OUTPUT = flags.DEFINE_string("output", None,
                              "Also write the report to this file.")

# Published decoders: (name, parameters, layers, width, key/value width).
_PUBLISHED = (
    ("Gemma 2B", 2.51e9, 18, 2048, 256),
    ("Llama 2 7B", 6.74e9, 32, 4096, 4096),
)
_RANK = 16
_FLOAT32 = 4
_BFLOAT16 = 2


def _measured():
  import keras  # pylint: disable=g-import-not-at-top
  import keras_hub  # pylint: disable=g-import-not-at-top
  import model_parallel_helper as helper  # pylint: disable=g-import-not-at-top
  from keras_mas.core import model_parallel  # pylint: disable=g-import-not-at-top
  rows = []
  for lora in (False, True):
    for shape in helper.MESHES:
      keras.distribution.set_distribution(model_parallel.make_distribution(
          shape, layout_map=model_parallel.layout_map_of(
              keras_hub.models.GemmaBackbone)))
      net, _, _, _ = helper._run("causal_lm", lora)  # pylint: disable=protected-access
      sizes = model_parallel.per_device_bytes(net)
      # What one device would hold with Ω and θ* replicated.
      replicated = 2 * 4 * sum(int(np.prod(v.shape))
                               for v in net._mas.targets)  # pylint: disable=protected-access
      rows.append((f"{shape[0]}×{shape[1]}", "LoRA 2" if lora else "full",
                   sizes["weights"], sizes["optimizer"], sizes["mas"],
                   replicated))
  return rows


def _lora_parameters(layers, width, kv_width):
  # KerasHub's enable_lora: the query and value projections of each layer.
  return layers * _RANK * ((width + width) + (width + kv_width))


def _on_paper():
  """Per device, GB: weights, Adam, MAS, their sum (gradients transient)."""
  rows = []
  for name, parameters, layers, width, kv_width in _PUBLISHED:
    trained_full = parameters
    trained_lora = _lora_parameters(layers, width, kv_width)
    for devices in (8, 64):
      for mode, trained, weight_bytes in (
          ("full, float32", trained_full, _FLOAT32),
          (f"LoRA {_RANK}, bfloat16 base", trained_lora, _BFLOAT16)):
        weights = (parameters * weight_bytes
                   + (trained if trained != parameters else 0) * _FLOAT32)
        adam = 2 * trained * _FLOAT32
        mas = 2 * trained * _FLOAT32  # Ω and θ*.
        rows.append((name, mode, devices,
                     *(b / devices / 1e9 for b in
                       (weights, adam, mas, weights + adam + mas))))
  return rows


def main(argv):
  del argv
  lines = ["# MAS under ModelParallel: memory per device", "",
           "`benchmarks/model_parallel_memory.py` on 8 CPU devices "
           "(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, "
           "KERAS_BACKEND=jax).", "",
           "## Measured (bytes on one device)", "",
           "Gemma causal LM from a config (2 layers, width 64, 8 heads, "
           "vocabulary 256; Gemma's layout map), Adam, after `consolidate` "
           "and one `fit` step.", "",
           "| mesh | trained | weights | Adam | MAS (Ω, θ*) | MAS if "
           "replicated |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for mesh, mode, weights, adam, mas, replicated in _measured():
    lines.append(f"| {mesh} | {mode} | {weights:,} | {adam:,} | {mas:,} "
                 f"| {replicated:,} |")
  lines += ["", "MAS holds two float32 copies of what trains, as Adam does, "
            "laid out as the variable each belongs to: on every mesh it "
            "takes what Adam takes on the same device. Gemma's layout map "
            "shards each kernel over both mesh axes, so every mesh holds an "
            "eighth of them; the LoRA factors are outside its map and stay "
            "replicated (so do their Adam and MAS state).", "",
            "## On paper (GB per device)", "",
            "| model | trained | devices | weights | Adam | MAS | total |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, mode, devices, weights, adam, mas, total in _on_paper():
    lines.append(f"| {name} | {mode} | {devices} | {weights:.2f} | "
                 f"{adam:.3f} | {mas:.3f} | {total:.2f} |")
  lines += ["", "Activations and the gradients of one step come on top. "
            "Full fine-tuning of a 7B decoder with MAS needs 20 bytes a "
            "parameter: 135 GB, which fits on 8 devices of 80 GB (17 GB "
            "each) but not on one; with LoRA rank 16 the MAS state is a "
            "few MB and the frozen bfloat16 weights dominate (13.5 GB: one "
            "80 GB device, or 8 of 16 GB)."]
  report = "\n".join(lines) + "\n"
  print(report)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(report)


if __name__ == "__main__":
  app.run(main)
