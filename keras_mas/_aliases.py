"""The module names of keras_mas 0.1 (one flat package), kept as aliases.

`import keras_mas.training` or `keras_mas.models` still works and gives the
module that now holds that code (the same object, so its private names and
monkeypatching behave as before). Nothing is imported until asked for.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Old name → where the module lives now.
MOVED = {
    "architectures": "experiments.architectures",
    "batch_statistics": "core.batch_statistics",
    "callbacks": "core.callbacks",
    "checkpoints": "experiments.checkpoints",
    "cli": "experiments.cli",
    "comparison": "experiments.comparison",
    "digits": "data.digits",
    "export": "experiments.export",
    "hard_buffer": "task_free.hard_buffer",
    "heads": "core.heads",
    "loss_window": "task_free.loss_window",
    "methods": "experiments.methods",
    "metrics": "experiments.metrics",
    "models": "core.models",
    "multi_worker": "core.multi_worker",
    "path_integral": "core.path_integral",
    "per_sample": "importance.per_sample",
    "pipelines": "data.pipelines",
    "regularizers": "core.regularizers",
    "sources": "data.sources",
    "streams": "data.streams",
    "tasks": "data.tasks",
    "training": "experiments.sequential",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds `keras_mas.<old name>` and loads it as the moved module."""

  def __init__(self):
    self._specs = {}

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    package, _, name = fullname.rpartition(".")
    if package == "keras_mas" and name in MOVED:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    module = importlib.import_module(
        "keras_mas." + MOVED[spec.name.rpartition(".")[2]])
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module):
    # Importing set the alias's spec on the module: it keeps its own.
    module.__spec__ = self._specs.pop(module.__spec__.name)


def install():
  """Makes the old names importable (once)."""
  if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())
