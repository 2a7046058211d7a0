"""Task-free MAS (Aljundi, Kelchtermans & Tuytelaars, CVPR 2019).

The library side: `TaskFreeConsolidation` (a Keras callback) and
`fit_stream` in `consolidation`, the `HardBuffer` rehearsed in the train
step, the `LossWindow` that finds peaks and plateaus. The experiment that
scores a stream against its baselines, `run_stream`, lives in
`keras_mas.experiments.streaming` (also reachable here).
"""

import importlib

from keras_mas.task_free.consolidation import DEFAULT_BUFFER_SIZE
from keras_mas.task_free.loss_window import DEFAULT_PEAK_MIN_HIGH
from keras_mas.task_free.loss_window import DEFAULT_PEAK_MIN_RELATIVE_RISE
from keras_mas.task_free.loss_window import DEFAULT_PEAK_QUANTILE
from keras_mas.task_free.loss_window import DEFAULT_PLATEAU_FALL_STDDEVS
from keras_mas.task_free.loss_window import DEFAULT_PLATEAU_MIN_RELATIVE_DROP
from keras_mas.task_free.loss_window import DEFAULT_WINDOW_SIZE
from keras_mas.task_free.consolidation import TaskFreeConsolidation
from keras_mas.task_free.consolidation import fit_stream
from keras_mas.task_free.hard_buffer import HardBuffer
from keras_mas.task_free.hard_buffer import repeat_updates
from keras_mas.task_free.loss_window import LossWindow

# The stream experiment, loaded on first use: the library does not import
# the harness.
_EXPERIMENT = ("DEFAULT_STRENGTH", "METHODS", "StreamRun", "accuracies",
               "format_results", "format_summary", "run_stream",
               "summarize_seeds")

__all__ = ["DEFAULT_BUFFER_SIZE", "DEFAULT_PEAK_MIN_HIGH",
           "DEFAULT_PEAK_MIN_RELATIVE_RISE", "DEFAULT_PEAK_QUANTILE",
           "DEFAULT_PLATEAU_FALL_STDDEVS", "DEFAULT_PLATEAU_MIN_RELATIVE_DROP",
           "DEFAULT_WINDOW_SIZE", "HardBuffer", "LossWindow",
           "TaskFreeConsolidation", "fit_stream", "repeat_updates",
           *_EXPERIMENT]


def __getattr__(name):
  if name in _EXPERIMENT:
    streaming = importlib.import_module("keras_mas.experiments.streaming")
    return getattr(streaming, name)
  raise AttributeError(
      f"module 'keras_mas.task_free' has no attribute {name!r}")
