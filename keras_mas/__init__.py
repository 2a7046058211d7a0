"""keras_mas: continual learning with Memory Aware Synapses for Keras 3.

Aljundi, Babiloni, Elhoseiny, Rohrbach and Tuytelaars, "Memory Aware Synapses:
Learning what (not) to forget", ECCV 2018.
"""

from keras_mas import importance
from keras_mas.models import MASModel
from keras_mas.models import FunctionalMASModel
from keras_mas.models import WrappedMASModel
from keras_mas.regularizers import MASRegularizer

__version__ = "0.1.0"

__all__ = [
    "MASModel",
    "FunctionalMASModel",
    "MASRegularizer",
    "WrappedMASModel",
    "importance",
]
