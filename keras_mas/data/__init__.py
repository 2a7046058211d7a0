"""Task sequences: where the data come from and how tasks are made.

`sources` (bundled digits, Fashion-MNIST, IDX, TFDS, image folders, the
user's model file), `tasks` (`TaskSequence`: recipes, the user's arrays,
folders, `tf.data` pipelines), `pipelines` (batching for fit, evaluation
and importance), `streams` (a sequence as one stream with hidden
boundaries) and `digits` (scikit-learn's digits, read without it).
"""

from keras_mas import _lazy

_MODULES, __getattr__, _dir = _lazy.submodules(__name__, __path__)
__all__ = list(_MODULES)


def __dir__():
  return _dir(globals())
