"""keras_mas: continual learning with Memory Aware Synapses for Keras 3.

Aljundi, Babiloni, Elhoseiny, Rohrbach and Tuytelaars, "Memory Aware Synapses:
Learning what (not) to forget", ECCV 2018.

`import keras_mas` registers `MASModel`, `MASRegularizer`, the task heads'
losses and metrics and the keras.applications input layer with Keras's
saving: do it before `keras.models.load_model` on a file that holds them
(Keras imports no package but its own to find a class). The other modules
(`keras_mas.tasks`, `keras_mas.metrics`, `keras_mas.training`, ...) load on
first use.
"""

import importlib
import pkgutil

# Registers `ApplicationPreprocessing`, which the checkpoints and exports of
# keras.applications runs hold.
from keras_mas import architectures
from keras_mas import callbacks
# The losses and metrics of task heads, registered for `load_model` of the
# app's checkpoints (compiled with them).
from keras_mas import heads
from keras_mas import importance
from keras_mas import models
from keras_mas import regularizers
from keras_mas.models import FunctionalMASModel
from keras_mas.models import MASModel
from keras_mas.models import WrappedMASModel
from keras_mas.regularizers import MASRegularizer

__version__ = "0.1.0"

# Every other module (`keras_mas.tasks`, `keras_mas.metrics`,
# `keras_mas.training`, ...) loads on first attribute access (PEP 562):
# `import keras_mas` stays as cheap as the core, and `keras_mas.training`,
# which imports most of the package, cannot meet a half-initialised
# `keras_mas`.
_SUBMODULES = tuple(sorted(
    m.name for m in pkgutil.iter_modules(__path__)
    if not m.name.startswith("_")))

__all__ = [
    "FunctionalMASModel",
    "MASModel",
    "MASRegularizer",
    "WrappedMASModel",
] + list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"keras_mas.{name}")
  raise AttributeError(f"module 'keras_mas' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
