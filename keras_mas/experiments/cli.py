"""The apps' entry point: bad input is one line on stderr, exit status 1.

Flags are the apps' own (the library reads none); this only turns a
`ValueError` (or `OSError`, `RuntimeError`) raised for the user's input into
the line a person reads, instead of a Python traceback.
"""

import os
import signal
import subprocess
import sys

from keras_mas.core import multi_process
from keras_mas.experiments import preemption

__all__ = ["fail", "main_with_one_line_errors", "supervised"]

# Set in the process `supervised` starts.
_SUPERVISED = "KERAS_MAS_SUPERVISED"
# The first line of the log JAX's runtime writes before it aborts the
# process, when the run's coordinator (process 0) has gone.
_RUNTIME_ABORT = "Terminating process because the JAX distributed service"


def main_with_one_line_errors(body):
  """An `absl.app.run` main that calls `body()` and reports bad input.

  Example:

  ```python
  def _main():
    training.run_sequence(...)

  main = cli.main_with_one_line_errors(_main)

  if __name__ == "__main__":
    app.run(main)
  ```

  Args:
    body: a function of no arguments doing the app's work.

  Returns:
    A function of `argv` for `absl.app.run`.
  """

  def main(argv):
    if len(argv) > 1:
      fail(f"Unexpected arguments {argv[1:]}; every setting is a --flag.")
    try:
      body()
    except (ValueError, OSError, RuntimeError) as e:
      if multi_process.count() > 1:
        _leave_processes(e)
      # Bad input is the user's to fix: one line, no traceback.
      fail(f"{type(e).__name__}: {e}")

  return main


def _leave_processes(error):
  """Ends a process of a run over several processes at once, in one line.

  A normal exit would wait at JAX's shutdown barrier for the other
  processes, which a lost process never reaches (JAX then aborts with pages
  of logs). The other processes stop too: their next collective fails.
  """
  if multi_process.peer_lost(error):
    line = (f"stopped: another process of this run stopped (process "
            f"{multi_process.index()} of {multi_process.count()} saw: "
            f"{type(error).__name__}: {str(error)[:200]}); start every "
            "process again with --resume to continue from the last "
            "checkpoint")
    status = preemption.EXIT_CODE
  else:
    line, status = f"error: {type(error).__name__}: {error}", 1
  print(" ".join(line.split()), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


def _ends_with_parent():
  """In the child: killed with its supervisor (SIGKILL included), as a
  process of the run would be, rather than left running alone."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def fail(message):
  """Prints `error: <message>` on one line to stderr and exits with 1."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)


def supervised():
  """Runs this app again as a child process and ends with its status;
  returns at once in the child.

  For a process of a run over several JAX processes: when the run's
  coordinator (process 0) goes, JAX's runtime aborts the others from a
  thread of its own, which Python cannot catch, after pages of logs. The
  supervisor passes the child's output on, leaves that log out, and ends
  in the one line and exit status (75) of a run that `--resume`
  continues. SIGTERM and SIGINT are passed to the child, which stops as
  usual.
  """
  if os.environ.get(_SUPERVISED):
    return
  child = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable] + sys.argv, env=dict(os.environ, **{_SUPERVISED: "1"}),
      stderr=subprocess.PIPE, text=True, errors="replace",
      # Its own session: a terminal's Ctrl-C reaches the child once, from
      # here (a second signal would end it without its checkpoint).
      start_new_session=True, preexec_fn=_ends_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda sig, unused_frame: child.send_signal(sig))
  aborted = False
  for line in child.stderr:
    aborted = aborted or _RUNTIME_ABORT in line
    if not aborted:
      sys.stderr.write(line)
      sys.stderr.flush()
  status = child.wait()
  if aborted:
    print("stopped: another process of this run stopped (the coordinator, "
          "process 0, is gone); start every process again with --resume to "
          "continue from the last checkpoint", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)
  sys.exit(status if status >= 0 else 128 - status)
