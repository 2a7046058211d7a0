"""run_stream: a task sequence learned as one stream, task-free, and scored.

The tasks' training data become one stream of small batches with hidden
boundaries (`keras_mas.data.streams`), learned by one `model.fit` with a
`keras_mas.task_free.TaskFreeConsolidation` callback, and scored at the
hidden boundaries against online fine-tuning, experience replay and MAS
told the true boundaries.
"""

import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mas.core import callbacks as callbacks_lib
from keras_mas.data import streams as streams_lib
from keras_mas.experiments import architectures
from keras_mas.experiments import checkpoints
from keras_mas.experiments import configs
from keras_mas.experiments import evaluation as evaluation_lib
from keras_mas.experiments import export as export_lib
from keras_mas.experiments import methods as methods_lib
from keras_mas.experiments import metrics as metrics_lib
from keras_mas.experiments import online_evaluation
from keras_mas.experiments import options
from keras_mas.experiments import preemption
from keras_mas.task_free import consolidation
from keras_mas.task_free import hard_buffer

__all__ = ["DEFAULT_STRENGTH", "METHODS", "StreamRun", "accuracies",
           "format_results", "format_summary", "run_stream",
           "summarize_seeds"]

# What `run_stream` compares, on the same stream and buffer size:
# task-free MAS; online fine-tuning (no buffer, no penalty); experience
# replay (the hard buffer rehearsed, no penalty); MAS consolidating on the
# buffer at the true (oracle) boundaries (see `keras_mas.experiments.methods`).
METHODS = methods_lib.names(task_free=True)

TaskFreeConsolidation = consolidation.TaskFreeConsolidation
LossWindow = consolidation.LossWindow
fit_stream = consolidation.fit_stream
DEFAULT_BUFFER_SIZE = hard_buffer.DEFAULT_BUFFER_SIZE
StreamRun = configs.StreamRun
DEFAULT_STRENGTH = StreamRun.strength


def accuracies(model, sequence, trained=None, batch_size=256):
  """Test accuracy on every task of `sequence`, as a task-aware run scores
  it (`evaluation.task_accuracies`)."""
  return evaluation_lib.task_accuracies(model, sequence, batch_size, trained)


class _BoundaryAccuracy(online_evaluation.EachIncomingBatch):
  """Row `i` of the accuracy matrix after step `boundaries[i]`; logged as a
  task-aware run logs it when `log_dir` is given."""

  def __init__(self, task_free, sequence, boundaries, log_dir=None):
    super().__init__(task_free)
    self.sequence, self.boundaries = sequence, list(boundaries)
    self.matrix = np.full((len(boundaries),) * 2, np.nan)
    self.baseline = None
    self.log_dir = log_dir
    self._writer = None

  def on_step(self, step):
    for i, boundary in enumerate(self.boundaries):
      if boundary == step:
        self.matrix[i] = accuracies(self.model, self.sequence, trained=i)
        if self.log_dir is not None and self.baseline is not None:
          if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
          so_far = metrics_lib.summarize(self.matrix[:i + 1, :i + 1],
                                         self.baseline[:i + 1])
          callbacks_lib.log_accuracy_matrix(self._writer, self.matrix,
                                            so_far, step=i)
          self._writer.flush()


def run_stream(sequence, run="mas", workdir=None, *, callbacks=None,
               stop=None, resume=False, verbose=0, **settings):
  """Learns `sequence` as one stream with hidden boundaries; scores it.

  The tasks' training data become one stream of small batches
  (`keras_mas.data.streams.from_sequence`), learned by one `model.fit` with a
  `TaskFreeConsolidation` callback; the learner never hears where a task
  ends. The accuracy matrix is still measured at the hidden boundaries,
  so the result compares with a task-aware run: `R[i][j]` = test accuracy
  on task `j` at the end of task `i`'s stretch. Every method runs the same
  `fit`: `mas` (the detector consolidates on the buffer), `mas_oracle`
  (consolidates on the buffer at the true boundaries), `replay` (the
  buffer rehearsed, never consolidated), `finetune` (no rehearsal).

  Example:

  ```python
  sequence = keras_mas.data.tasks.make_sequence("digits", "split", "domain", 5)
  results = keras_mas.task_free.run_stream(sequence, method="mas")
  print(results["acc"], results["forgetting"], results["consolidations"])
  ```

  Args:
    sequence: a domain- or class-incremental `keras_mas.data.tasks.TaskSequence`,
      of arrays or of `tf.data` pipelines (`from_datasets`, a task spec's
      TFRecords or datasets): pipelines are streamed, never held whole, and
      give the same run as arrays of the same data.
    run: a `keras_mas.experiments.configs.StreamRun`, the run's settings,
      or one of `METHODS` (`StreamRun(method=run)`).
    workdir: if given, `results.json`, `online_accuracy.png` (the
      prequential and anytime average accuracy along the stream, changes
      and consolidations marked), TensorBoard logs (`tensorboard/`, the
      stream's scalars under `stream/`) and the final model as a
      SavedModel (`export/`) are written there; with `run.checkpoint_every`
      a checkpoint is written into `workdir/checkpoint/` every that many
      incoming batches (the model with its optimizer, Ω and θ*; the
      window, the buffer, the accuracy rows and the online record),
      replaced whole each time; with `run.export_consolidations` a
      SavedModel at each consolidation, in
      `export_consolidations/step_<incoming batch>/`.
    callbacks: more Keras callbacks for the `fit` (their batch index
      counts train steps, `updates_per_batch` per incoming batch).
    stop: a `preemption.StopRequest`: once set (SIGTERM, SIGINT under
      `preemption.on_signals`), the stream stops at the end of the incoming
      batch under way, a checkpoint is written there (with `workdir`) and
      `preemption.Preempted` is raised; `resume` continues from it.
    resume: continue the run whose checkpoint is in `workdir` (same
      settings); the result equals that of an uninterrupted run.
    verbose: 1 prints the table at the end.
    **settings: `StreamRun` fields that replace `run`'s:
      `run_stream(s, method="replay", buffer_size=100)` is
      `run_stream(s, StreamRun(method="replay", buffer_size=100))`.

  Returns:
    A dict: `method`, `dataset`, `recipe`, `scenario`, `tasks`,
    `accuracy_matrix`, `baseline`, `acc`, `bwt`, `fwt`, `forgetting`,
    `boundaries` (true steps), `consolidations` (steps), `peaks`,
    `plateaus`, `online_accuracy` (prequential, whole stream),
    `online_accuracy_per_task` (over each task's stretch), `online` (the
    anytime records: `step`, `tasks_seen`, `accuracies`,
    `anytime_average_accuracy`, `prequential_accuracy`), `num_steps`,
    `config`, `seconds`.

  Raises:
    ValueError: naming the argument, before any training; for `resume`, if
      the checkpoint is missing, damaged or of other settings; without
      `resume`, if `workdir` holds a checkpoint.
  """
  if isinstance(run, str):
    settings.setdefault("method", run)
    run = None
  run = dataclasses.replace(run or configs.StreamRun(), **settings)
  stream = streams_lib.from_sequence(sequence, batch_size=run.batch_size,
                                     transition_steps=run.transition_steps,
                                     seed=run.seed)
  consolidate_at = {"mas": "plateaus", "mas_oracle": stream.boundaries[:-1],
                    "finetune": None, "replay": None}[run.method]
  log_dir = None if workdir is None else os.path.join(workdir, "tensorboard")
  task_free = TaskFreeConsolidation(
      buffer_size=run.buffer_size, window=copy.deepcopy(run.window),
      rehearse=run.method != "finetune", consolidate_at=consolidate_at or None,
      updates_per_batch=run.updates_per_batch, log_dir=log_dir)
  if (run.checkpoint_every is not None or resume) and workdir is None:
    raise ValueError(
        "Invalid value for argument `workdir`. Expected a directory for "
        "checkpoint_every or resume. Received: workdir=None")
  config = run.recorded()
  # One run per workdir (see `checkpoints.workdir_lock`).
  with (contextlib.nullcontext() if workdir is None else
        checkpoints.workdir_lock(workdir)):
    checkpoint_dir = (None if workdir is None
                      else os.path.join(workdir, _CHECKPOINT))
    if checkpoint_dir is not None and not resume and os.path.isdir(
        checkpoint_dir):
      raise ValueError(
          "Invalid value for argument `workdir`. Expected a directory without "
          "a stream checkpoint, or resume=True to continue it. Received: "
          f"workdir={workdir!r} holding {checkpoint_dir}")
    net = architectures.build(run.model, sequence.input_shape,
                              sequence.num_outputs,
                              hidden_units=run.hidden_units, seed=run.seed)
    # The accuracy metric is the prequential accuracy (see MASModel.rehearsal);
    # no XLA: the joined batch grows while the buffer fills.
    net.compile(optimizer=options.check_optimizer(run.optimizer,
                                                  run.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=["accuracy"], jit_compile=False)
    net.strength = run.strength
    evaluation = _BoundaryAccuracy(task_free, sequence, stream.boundaries,
                                   log_dir)
    online = online_evaluation.AnytimeAccuracy(
        task_free, sequence, stream.boundaries, every=run.online_every,
        log_dir=log_dir)
    first_step, seconds_before = 0, 0.0
    if resume:
      net, first_step, seconds_before = _restore(
          checkpoint_dir, config, task_free, evaluation, online)
    else:
      evaluation.baseline = accuracies(net, sequence)
    listed = [evaluation, online]
    if run.export_consolidations and workdir is not None:
      listed.append(_ExportAtConsolidation(
          task_free, os.path.join(workdir, "export_consolidations"),
          sequence))
    listed += list(callbacks or [])
    stream_checkpoint = None
    if checkpoint_dir is not None or stop is not None:
      stream_checkpoint = _StreamCheckpoint(
          checkpoint_dir, run.checkpoint_every, config, task_free, evaluation,
          online, evaluation.baseline, stream.num_steps, seconds_before, stop)
      listed.append(stream_checkpoint)
    keras.utils.set_random_seed(run.seed)
    started = time.perf_counter()
    fit_stream(net, stream.as_dataset().skip(first_step), task_free,
               callbacks=listed)
    if stream_checkpoint is not None and (
        stream_checkpoint.stopped_at is not None):
      step = stream_checkpoint.stopped_at
      task = sum(b <= step for b in stream.boundaries[:-1])
      raise preemption.Preempted(
          stop.reason, task,
          f"the stream checkpoint at incoming batch {step}"
          if checkpoint_dir is not None else "the start (no workdir)")
    results = _results(run, sequence, stream, task_free, evaluation, online,
                       config, seconds_before + time.perf_counter() - started)
    if workdir is not None:
      os.makedirs(workdir, exist_ok=True)
      export_lib.export_serving(net, os.path.join(workdir, "export"),
                                sequence.input_shape, heads=_heads(sequence))
      online_evaluation.plot_stream(
          results, os.path.join(workdir, "online_accuracy.png"))
      checkpoints.write_json(os.path.join(workdir, "results.json"), results)
    if verbose:
      print(format_results([results]))
    return results


def _restore(checkpoint_dir, config, task_free, evaluation, online):
  """`(model, first incoming batch, seconds so far)` of the checkpointed
  stream; the callbacks' state is restored from it."""
  net, state = _read_checkpoint(checkpoint_dir, config)
  task_free.set_state(state)
  evaluation.baseline = state["baseline"]
  evaluation.matrix = np.array(
      [[np.nan if v is None else v for v in row] for row in state["matrix"]],
      dtype="float64")
  online.records = state.get("online", [])
  return net, task_free.step, state["seconds"]


def _results(run, sequence, stream, task_free, evaluation, online, config,
             seconds):
  """The results dict of a finished stream."""
  starts = [0] + stream.boundaries[:-1]
  per_task = []
  for start, end in zip(starts, stream.boundaries):
    part = task_free.online_correct[start:end]
    per_task.append(sum(c for c, _ in part) / max(1, sum(n for _, n in part)))
  return evaluation_lib.results(
      run.method, sequence, evaluation.matrix, evaluation.baseline, config,
      boundaries=list(stream.boundaries),
      consolidations=list(task_free.consolidations),
      peaks=list(task_free.window.peaks[1:]),
      plateaus=list(task_free.window.plateaus),
      online_accuracy=task_free.online_accuracy,
      online_accuracy_per_task=per_task, online=list(online.records),
      num_steps=stream.num_steps, seconds=seconds)


_CHECKPOINT = "checkpoint"


def _heads(sequence):
  """The export's extra signature: class-incremental, the classes seen."""
  if sequence.scenario != "class":
    return None
  return {"seen": (0, max(t.stop for t in sequence.tasks))}


class _ExportAtConsolidation(online_evaluation.EachIncomingBatch):
  """A SavedModel at each consolidation, `step_<incoming batch>/` under
  `directory`: the model as deployed from then on."""

  def __init__(self, task_free, directory, sequence):
    super().__init__(task_free)
    self.directory, self.sequence = directory, sequence
    self._exporter = None

  def on_step(self, step):
    if not self.task_free.consolidations or (
        self.task_free.consolidations[-1] != step):
      return
    if self._exporter is None:
      self._exporter = export_lib.ServingExport(self.model,
                                                self.sequence.input_shape)
    self._exporter.write(os.path.join(self.directory, f"step_{step}"),
                         _heads(self.sequence))


class _StreamCheckpoint(online_evaluation.EachIncomingBatch):
  """Every `every` incoming batches (None: never), and when `stop` is set:
  the model and the stream's state; then, on a stop, `fit` ends."""

  def __init__(self, directory, every, config, task_free, evaluation, online,
               baseline, num_steps, seconds_before, stop=None):
    super().__init__(task_free)
    self.directory, self.every, self.config = directory, every, config
    self.evaluation, self.online = evaluation, online
    self.baseline, self.num_steps = baseline, num_steps
    self.started = time.perf_counter() - seconds_before
    self.stop, self.stopped_at = stop, None

  def on_step(self, step):
    stopping = (self.stop is not None and self.stop.is_set()
                and step < self.num_steps)
    if stopping:
      # At an incoming batch's end, whole: its checkpoint, then `fit` ends.
      self.stopped_at = step
      self.model.stop_training = True
    if step >= self.num_steps or self.directory is None or not stopping and (
        self.every is None or step % self.every):
      return
    state = self.task_free.get_state()
    parent = os.path.dirname(self.directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=parent)
    self.model.save(os.path.join(staging, "model.keras"))
    np.savez(os.path.join(staging, "buffer.npz"),
             **{k: v for k, v in state["buffer"].items() if v is not None})
    with open(os.path.join(staging, "state.json"), "w") as f:
      json.dump({"config": self.config, "stream": state["stream"],
                 "baseline": self.baseline,
                 "matrix": [[None if np.isnan(v) else float(v) for v in row]
                            for row in self.evaluation.matrix],
                 "online": self.online.records,
                 "seconds": time.perf_counter() - self.started}, f)
    checkpoints.replace_directory(staging, self.directory)


def _read_checkpoint(directory, config):
  """`(model, state)` of a stream checkpoint, checked against `config`."""
  if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
    directory += ".old"  # Interrupted between the two renames.
  try:
    with open(os.path.join(directory, "state.json")) as f:
      state = json.load(f)
    with np.load(os.path.join(directory, "buffer.npz")) as saved:
      buffer = {k: saved[k] for k in ("inputs", "labels", "losses")
                if k in saved}
    model = keras.models.load_model(os.path.join(directory, "model.keras"),
                                    safe_mode=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `resume`. Expected a readable stream "
        f"checkpoint in {directory}. Received: {type(e).__name__}: {e}"
    ) from e
  checkpoints.check_config(state.get("config"), config, directory)
  state["buffer"] = buffer or {"inputs": None}
  return model, state


def format_results(results):
  """One line per run: ACC, BWT, forgetting, online accuracy, consolidations."""
  lines = [f"{'method':<11} {'ACC':>6} {'BWT':>7} {'forget':>7} "
           f"{'online':>7}  consolidations (true boundaries)"]
  for r in results:
    lines.append(
        f"{r['method']:<11} {r['acc']:6.3f} {r['bwt']:+7.3f} "
        f"{r['forgetting']:7.3f} {r['online_accuracy']:7.3f}  "
        f"{r['consolidations']} ({r['boundaries'][:-1]})")
  return "\n".join(lines)


def summarize_seeds(runs):
  """Mean and standard deviation over seeds, per method.

  Args:
    runs: one list of `run_stream` results per seed, the same methods in
      each.

  Returns:
    One dict per method: `method`, `seeds`, the mean and standard deviation
    (`*_mean`, `*_std`) of `acc`, `forgetting` and `online_accuracy`, the
    number of `consolidations` of each seed and `hidden_changes` (tasks − 1).
  """
  summary = []
  for k, first in enumerate(runs[0]):
    per_seed = [run[k] for run in runs]
    row = {"method": first["method"], "seeds": len(per_seed),
           "hidden_changes": len(first["boundaries"]) - 1,
           "consolidations": [len(r["consolidations"]) for r in per_seed]}
    for key in ("acc", "forgetting", "online_accuracy"):
      values = np.array([r[key] for r in per_seed], dtype="float64")
      row[f"{key}_mean"] = float(values.mean())
      row[f"{key}_std"] = float(values.std())
    summary.append(row)
  return summary


def format_summary(summary):
  """`summarize_seeds`'s rows as a Markdown table (the task-free guide's)."""
  lines = ["| method | ACC | forgetting | online accuracy | consolidations |",
           "|---|---|---|---|---|"]
  for row in summary:
    counts = row["consolidations"]
    lines.append(
        f"| {row['method']} | {row['acc_mean']:.3f} ± {row['acc_std']:.3f} "
        f"| {row['forgetting_mean']:.3f} ± {row['forgetting_std']:.3f} "
        f"| {row['online_accuracy_mean']:.3f} ± "
        f"{row['online_accuracy_std']:.3f} "
        f"| {np.mean(counts):.1f} ({', '.join(map(str, counts))}) |")
  return "\n".join(lines)
