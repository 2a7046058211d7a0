"""Runs test scripts one after another in one process on one Keras backend.

The other end of `tests/backend_processes.py`: each line of stdin is a JSON
request `{"code": ...}`; the script runs in a fresh namespace, its stdout
captured, and one JSON line answers `{"ok", "stdout", "error"}`. Between
scripts the global settings a script may change go back to Keras's
defaults, so that each starts as a new process would (its seeds are its
own: the scripts set them).
"""

import contextlib
import io
import json
import os
import sys
import traceback


def _reset():
  import keras  # pylint: disable=g-import-not-at-top
  keras.distribution.set_distribution(None)
  keras.config.set_dtype_policy("float32")
  keras.config.set_floatx("float32")
  keras.utils.clear_session()


def main():
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
      _reset()
    except Exception:  # pylint: disable=broad-except
      ok, error = False, error + traceback.format_exc()
    answers.write(json.dumps({"ok": ok, "stdout": captured.getvalue(),
                              "error": error}) + "\n")
    answers.flush()


if __name__ == "__main__":
  main()
