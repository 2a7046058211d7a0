"""Training a task so that it can stop anywhere and resume to the same end.

`InTaskCheckpoint` writes checkpoints inside a task (at epoch ends, every so
many steps, and where a stop request ends training); `fit_task` trains a
task's epochs from an `(epoch, batch)` position, drawing the data orders
an uninterrupted run would have drawn. Both runners
(`sequential.run_sequence`, `language.run_corpora`) train through them.
"""

import os
import sys
import time
import warnings

import keras
import tensorflow as tf

from keras_mas.core import callbacks as callbacks_lib
from keras_mas.core import multi_process
from keras_mas.experiments import checkpoints

__all__ = ["InTaskCheckpoint", "fit_task", "resumes_from"]


class InTaskCheckpoint(keras.callbacks.Callback):
  """Checkpoints inside task `k`, and stops on request.

  At epoch ends, at most every `seconds`; every `steps` training steps
  inside an epoch if given; and where training stops when `stop` is set
  (then `fit` ends). `last` is the `(epoch, batch)` of the last one.
  """

  def __init__(self, write_dir, k, epochs, first, seconds, steps, stop,
               state):
    super().__init__()
    self.write_dir, self.k, self.epochs = write_dir, k, epochs
    self.seconds, self.steps = seconds, steps
    self.stop, self.state = stop, state
    self.first = first
    self.last = first if first != (0, 0) else None
    self._last_time = time.monotonic()
    self._last_step = None
    self._epoch, self._offset = 0, 0

  def _write(self, epoch, batch):
    checkpoints.write_in_task(self.write_dir, self.k, epoch, batch,
                              self.model, self.state())
    self.last, self._last_time = (epoch, batch), time.monotonic()
    self._last_step = (epoch, batch)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch - self.k * self.epochs
    # The rest of a resumed epoch counts its batches from 0 again.
    self._offset = (self.first[1] if self._epoch == self.first[0]
                    and self.last == self.first else 0)

  def on_train_batch_end(self, batch, logs=None):
    done = batch + 1 + self._offset
    stopping = self.stop is not None and self.stop.is_set()
    due = self.steps is not None and done - (
        self._last_step[1] if self._last_step
        and self._last_step[0] == self._epoch else 0) >= self.steps
    if stopping or due:
      self._write(self._epoch, done)
    if stopping:
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    within = epoch - self.k * self.epochs
    if (within >= self.epochs - 1  # The task's own checkpoint follows.
        or self.model.stop_training
        or time.monotonic() - self._last_time < self.seconds):
      return
    self._write(within + 1, 0)


def resumes_from(k, at):
  """Where a run stopped in task `k` continues (`at`: `(epoch, batch)` of
  its last checkpoint inside the task, or None)."""
  if at is not None:
    return f"the checkpoint inside task {k} at epoch {at[0]}, batch {at[1]}"
  return f"the checkpoint after task {k - 1}" if k else "the start"


def fit_task(net, x, k, epochs, first, verbose, write_dir, writer,
             extra_callbacks=()):
  """Trains task `k`'s epochs on the batched, shuffled dataset `x`.

  From `first` = `(epoch, batch)` past the task's start (resumed inside the
  task) the data orders of the epochs done, and the batches of the epoch
  under way, are drawn and skipped: the rest of the task sees the batches
  an uninterrupted run sees (a dataset of unknown size sees them for its
  first resumed epoch only). Epochs are counted from the sequence's start
  (`k * epochs`), so TensorBoard's curves run on across tasks.
  """
  # Each new iterator of the dataset draws the next order. Keras's `fit`
  # makes two per epoch of a dataset of known size (one to start the epoch,
  # one at its end that the next epoch does not use); one for the first
  # epoch of a dataset of unknown size. Draw those of the epochs trained.
  size = int(x.cardinality())
  epoch, batch = first
  if size > 0 and batch >= size:
    epoch, batch = epoch + 1, 0
  for _ in range(2 * epoch if size > 0 else max(0, 2 * epoch - 1)):
    iter(x)
  fit_options = dict(
      # Progress bars only on a terminal: in a log file they are a flood
      # (the line per task says how the task went).
      verbose=verbose if sys.stdout.isatty() else 0,
      shuffle=False,  # Keras warns that it cannot shuffle a pipeline.
      callbacks=[
          keras.callbacks.TensorBoard(
              os.path.join(write_dir, "tensorboard"), write_graph=False),
          callbacks_lib.DriftLogger(writer),
          # MASModel.fit adds DivergenceGuard itself (first).
      ] + list(extra_callbacks))
  with warnings.catch_warnings():
    # A pipeline of unknown size ends its epoch where its data end, as it
    # should: Keras warns about that.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    if batch:
      # The rest of the epoch under way: its iterator, the batches trained
      # drawn and dropped; a dataset still, which a preprocessor maps over.
      iterator = iter(x)
      for _ in range(batch):
        next(iterator)
      rest = tf.data.Dataset.from_generator(
          lambda: iterator, output_signature=x.element_spec)
      with multi_process.own_rows(rest) as batches:
        net.fit(batches, initial_epoch=k * epochs + epoch,
                epochs=k * epochs + epoch + 1, **fit_options)
      if net.stop_training:
        return
      iter(x)  # The one an uninterrupted epoch makes at its end.
      epoch += 1
    if epoch < epochs:
      with multi_process.own_rows(x) as batches:  # Batched, shuffled.
        net.fit(batches, initial_epoch=k * epochs + epoch,
                epochs=(k + 1) * epochs, **fit_options)
