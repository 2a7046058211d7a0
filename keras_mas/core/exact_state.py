"""What Keras's saving changes or drops, kept exactly so that training resumes.

Two parts of a model do not come back from a Keras file as they were:

* **LoRA layers.** Keras saves a LoRA-enabled layer (`Dense`, `EinsumDense`,
  `Embedding`, and KerasHub's layers built on them) with its low-rank update
  merged into the kernel, and on loading sets both factors to zero. The
  loaded layer computes what the saved one computed, but has stopped
  learning: with `A = B = 0` neither factor gets a gradient (`∂L/∂A ∝ B`,
  `∂L/∂B ∝ A`). A model whose only trainable weights are LoRA factors (a
  Gemma or Llama causal LM under `backbone.enable_lora`) then trains nothing
  after `load_weights`, a `.keras` load, `BackupAndRestore` or a resume, and
  says nothing; Ω and θ* would describe factors that no longer exist.
* **Random-seed states.** The state of each layer's `SeedGenerator`
  (dropout's masks) is not saved: a resumed run would draw the masks of a
  fresh model, not those the uninterrupted run draws next.

`ExactState` keeps both in the model's file, each LoRA layer's own
variables as they are (the kernel before the merge, both factors, the
bias), and puts them back once the layers have loaded: the model loaded is
the model saved, bit for bit. The layers' own entries keep Keras's merged
kernel, as Keras writes them.
"""

import warnings

import keras
import numpy as np
from keras.src.saving import keras_saveable

__all__ = ["ExactState", "lora_layers"]


def lora_layers(model):
  """The LoRA-enabled layers inside `model`, in a fixed order."""
  return [layer for layer in _layers(model)
          if getattr(layer, "lora_enabled", False)]


def _layers(model):
  return model._flatten_layers(include_self=False)  # pylint: disable=protected-access


def _own_variables(layer):
  # Unmerged: the layer's `_kernel`, not its merged `kernel` property.
  # pylint: disable-next=protected-access
  return list(layer._trainable_variables) + list(
      layer._non_trainable_variables)


def _seed_states(model):
  # pylint: disable-next=protected-access
  return [generator.state for layer in _layers(model)
          for generator in getattr(layer, "_seed_generators", ())]


def _factors_are_zero(layer):
  factors = [v for v in _own_variables(layer) if "lora_" in v.path]
  return bool(factors) and all(
      not np.any(keras.ops.convert_to_numpy(v.value)) for v in factors)


class ExactState(keras_saveable.KerasSaveable):
  """A saving entry for the LoRA layers' own variables and the seed states.

  Held by a `MASModel` under a private attribute: Keras's saving visits a
  saveable's private attributes after its layers (`saving_lib._name_key`),
  so `load_own_variables` here runs once the layers have loaded (and zeroed
  their factors), in `load_weights`, `keras.models.load_model` and every
  route built on them. A file without this entry (written before it
  existed) loads as Keras loads it.

  Args:
    model: the `keras.Model` whose layers to keep; read at each save and
      load, so LoRA enabled after this object was made is kept too.
  """

  def __init__(self, model):
    # A function, not the model: a saveable attribute would be walked (and
    # saved) again below this entry.
    self._model = lambda: model

  def _obj_type(self):
    # Saving asks each saveable for its type to know which attributes to
    # skip; an Operation's set fits an object that holds no saveables.
    return "Operation"

  def _variables(self):
    model = self._model()
    return [v for layer in lora_layers(model)
            for v in _own_variables(layer)] + _seed_states(model)

  def save_own_variables(self, store):
    for i, variable in enumerate(self._variables()):
      store[str(i)] = variable

  def load_own_variables(self, store):
    model, variables = self._model(), self._variables()
    count = len(store.keys())
    if not count:
      stuck = [layer.name for layer in lora_layers(model)
               if _factors_are_zero(layer)]
      if stuck:
        warnings.warn(
            f"The LoRA layers {stuck} of model '{model.name}' were loaded "
            "from a file that holds their update merged into the kernels "
            "only (as Keras alone writes it): their factors are zero and "
            "get no gradient, so further training leaves them unchanged. "
            "Load the merged model into a base without LoRA and enable LoRA "
            "on it again to go on adapting it.", stacklevel=2)
      return
    if count != len(variables):
      raise ValueError(
          f"Model '{model.name}' has {len(variables)} variables in its LoRA "
          f"layers and random-seed states, but the file holds {count}: it "
          "was saved with LoRA on other layers, or another architecture. "
          "Enable LoRA as it was when the file was saved before loading it.")
    for i, variable in enumerate(variables):
      variable.assign(store[str(i)])
