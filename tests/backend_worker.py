"""Runs test scripts one after another in one process on one Keras backend.

The other end of `tests/backend_processes.py`: each line of stdin is a JSON
request `{"code": ...}`; the script runs in a fresh namespace, its stdout
captured, and one JSON line answers `{"ok", "stdout", "error"}`. Between
scripts the global settings a script may change go back to Keras's
defaults, and the globals of keras_mas's modules (which scripts patch, to
compare a closed form with the mapped gradients) to their values after
import, so that each script starts as a new process would (its seeds are
its own: the scripts set them).
"""

import contextlib
import importlib.abc
import importlib.machinery
import io
import json
import os
import sys
import traceback


class _ImportedGlobals(importlib.abc.MetaPathFinder):
  """Records each keras_mas module's globals as its import leaves them."""

  def __init__(self):
    self.globals = {}

  def find_spec(self, name, path, target=None):
    del target  # Unused.
    if name.split(".")[0] != "keras_mas":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
      return spec
    execute, recorded = spec.loader.exec_module, self.globals

    def exec_module(module):
      execute(module)
      recorded[name] = dict(vars(module))

    spec.loader.exec_module = exec_module
    return spec


def _reset(imported):
  """Keras's settings to their defaults; each global of keras_mas's modules
  a script replaced back to its value after import (names added since, such
  as a package's submodules, stay)."""
  for name, values in imported.globals.items():
    namespace = vars(sys.modules[name])
    for key, value in values.items():
      if namespace.get(key, _MISSING) is not value:
        namespace[key] = value
  import keras  # pylint: disable=g-import-not-at-top
  keras.distribution.set_distribution(None)
  keras.config.set_dtype_policy("float32")
  keras.config.set_floatx("float32")
  keras.utils.clear_session()


_MISSING = object()


def main():
  imported = _ImportedGlobals()
  sys.meta_path.insert(0, imported)
  # Answers on a descriptor of their own: output written below Python
  # (a library's C++ logging to descriptor 1) goes to stderr instead.
  answers = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  for line in sys.stdin:
    code = json.loads(line)["code"]
    captured = io.StringIO()
    ok, error = True, ""
    try:
      with contextlib.redirect_stdout(captured):
        exec(compile(code, "<script>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
    except BaseException:  # pylint: disable=broad-except
      ok, error = False, traceback.format_exc()
    try:
      _reset(imported)
    except Exception:  # pylint: disable=broad-except
      ok, error = False, error + traceback.format_exc()
    answers.write(json.dumps({"ok": ok, "stdout": captured.getvalue(),
                              "error": error}) + "\n")
    answers.flush()


if __name__ == "__main__":
  main()
