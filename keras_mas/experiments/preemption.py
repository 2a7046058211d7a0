"""Stopping a run at a safe point when asked (SIGTERM, SIGINT).

Schedulers and cloud providers send SIGTERM before they take a machine
away. `on_signals` turns SIGTERM and SIGINT into a `StopRequest`; a run
given one (`run_sequence(stop=...)`) finishes the training step under way,
keeps its last checkpoint and raises `Preempted`, which the apps report in
one line before exiting with `EXIT_CODE`. The same command with `--resume`
continues from that checkpoint.

Example:

```python
stop = preemption.StopRequest()
with preemption.on_signals(stop):
  try:
    run_sequence(sequence, workdir, stop=stop)
  except preemption.Preempted as e:
    print(e)
    sys.exit(preemption.EXIT_CODE)
```
"""

import contextlib
import signal
import threading

__all__ = ["EXIT_CODE", "Preempted", "StopRequest", "on_signals"]

# EX_TEMPFAIL (sysexits.h): a temporary failure, try again (with --resume).
EXIT_CODE = 75


class StopRequest:
  """Set once a stop is asked for; remembers why."""

  def __init__(self):
    self._event = threading.Event()
    self.reason = None

  def set(self, reason="a stop request"):
    self.reason = self.reason or reason
    self._event.set()

  def is_set(self):
    return self._event.is_set()


class Preempted(Exception):
  """A run stopped on request; its last checkpoint is intact.

  Attributes:
    reason: what asked for the stop (e.g. `"SIGTERM"`).
    task: the task under way when it stopped.
    resume_from: a description of the checkpoint `resume` continues from.
  """

  def __init__(self, reason, task, resume_from):
    self.reason, self.task, self.resume_from = reason, task, resume_from
    super().__init__(
        f"Stopped by {reason} during task {task}; the run continues from "
        f"{resume_from} when started again with resume (the app's "
        "--resume).")


@contextlib.contextmanager
def on_signals(stop, signals=(signal.SIGTERM, signal.SIGINT)):
  """Within the block, `signals` set `stop` instead of ending the process.

  A second signal of the same kind ends the process as before, for a user
  who does not want to wait. Only the main thread can install handlers;
  elsewhere this does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  previous = {}

  def handler(number, frame):
    del frame
    name = signal.Signals(number).name
    if stop.is_set():
      signal.signal(number, previous[number])
      signal.raise_signal(number)
    stop.set(name)

  for number in signals:
    previous[number] = signal.signal(number, handler)
  try:
    yield stop
  finally:
    for number, old in previous.items():
      signal.signal(number, old)
