"""keras_mas: continual learning with Memory Aware Synapses for Keras 3.

Aljundi, Babiloni, Elhoseiny, Rohrbach and Tuytelaars, "Memory Aware Synapses:
Learning what (not) to forget", ECCV 2018.

The library:

* `keras_mas.core`: `MASModel`, `MASRegularizer`, the penalty and its state,
  Synaptic Intelligence's path, BatchNormalization statistics across tasks.
* `keras_mas.importance`: `mas`, `local_mas`, `fisher` (exact per-sample
  importance on any Keras model).
* `keras_mas.task_free`: consolidation on a stream without task boundaries.

The experiment harness, which the apps drive:

* `keras_mas.data`: task sequences from bundled, real and the user's data.
* `keras_mas.experiments`: `run_sequence`, `run_stream`, methods, metrics,
  checkpoints, export, comparisons.

`import keras_mas` registers `MASModel`, `MASRegularizer`, the task heads'
losses and metrics and the keras.applications input layer with Keras's
saving: do it before `keras.models.load_model` on a file that holds them
(Keras imports no package but its own to find a class). The other modules
load on first use; their 0.1 names (`keras_mas.training`, `keras_mas.tasks`,
`keras_mas.models`, ...) still import, as aliases.
"""

from keras_mas import _aliases
from keras_mas import _lazy
from keras_mas import importance
from keras_mas.core import callbacks
from keras_mas.core import heads
from keras_mas.core import models
from keras_mas.core import regularizers
from keras_mas.core.models import FunctionalMASModel
from keras_mas.core.models import MASModel
from keras_mas.core.models import WrappedMASModel
from keras_mas.core.regularizers import MASRegularizer
# Registers `ApplicationPreprocessing`, which the checkpoints and exports of
# keras.applications runs hold.
from keras_mas.experiments import architectures

__version__ = "0.1.0"

_aliases.install()

# Subpackages, and the 0.1 module names, load on first attribute access
# (PEP 562): `import keras_mas` stays as cheap as the core.
_SUBMODULES, __getattr__, _dir = _lazy.submodules(
    __name__, __path__, extra=_aliases.MOVED)

__all__ = [
    "FunctionalMASModel",
    "MASModel",
    "MASRegularizer",
    "WrappedMASModel",
] + list(_SUBMODULES)


def __dir__():
  return _dir(globals())
