"""The experiment harness: task sequences learned, scored and saved.

`sequential.run_sequence` (one `fit` per task, the loop behind
`apps/sequential_finetune.py`), `streaming.run_stream` (task-free
streams), `language.run_corpora` (causal language models on text
corpora), `configs` (each runner's settings, one typed object),
`comparison` (λ selection, seeds, tables), `methods` (each
continual-learning method's data, loss and consolidation), `metrics`
(ACC, BWT, FWT, forgetting), `checkpoints`, `export` (SavedModels),
`architectures` (models to run) and `cli` (the apps' one-line errors).
The library (`keras_mas.core`, `keras_mas.importance`) imports nothing
from here.
"""

from keras_mas import _lazy

_MODULES, __getattr__, _dir = _lazy.submodules(__name__, __path__)
__all__ = list(_MODULES)


def __dir__():
  return _dir(globals())
