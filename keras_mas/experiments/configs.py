"""The settings of a run, one typed object per runner, checked when made.

`SequenceRun` (`sequential.run_sequence`), `StreamRun`
(`streaming.run_stream`) and `LanguageRun` (`language.run_corpora`) each
hold every plain setting of their runner: the apps fill one from their
flags, the runner takes it, `results.json` records `recorded()`, and a
resume compares the recorded settings with the new run's. What is not a
setting (the data, the user's model, the workdir, a stop request) stays an
argument of the runner.

Example:

```python
run = keras_mas.experiments.configs.SequenceRun(method="mas", epochs=5)
sequence = keras_mas.data.tasks.make_sequence("digits", "permuted", "domain", 3)
results = keras_mas.experiments.sequential.run_sequence(sequence, "/tmp/run", run)
print(results["config"]["epochs"], results["acc"])
```
"""

import dataclasses
import os

import numpy as np

from keras_mas.core import batch_statistics
from keras_mas.core import models
from keras_mas.core import regularizers
from keras_mas.experiments import architectures
from keras_mas.experiments import methods as methods_lib
from keras_mas.experiments import options
from keras_mas.task_free import _checks
from keras_mas.task_free import hard_buffer
from keras_mas.task_free import loss_window

__all__ = ["EXPORTS", "LANGUAGE_METHODS", "LanguageRun", "SequenceRun",
           "StreamRun"]

# Importance estimator of each language-model method (None: no penalty).
LANGUAGE_METHODS = {"mas": "mas", "local_mas": "local_mas", "l2": "l2",
                    "finetune": None}
# Timing options: a resume may change them.
_TIMING = ("checkpoint_seconds", "checkpoint_steps")
# What a run writes besides its results and checkpoints: a resume may
# change it too.
_OUTPUTS = ("export", "importance_histograms")
# `SequenceRun.export`: a SavedModel after every task, after the last only,
# or none.
EXPORTS = ("every_task", "last", "none")


def _set(run, name, value):
  object.__setattr__(run, name, value)


def _check_checkpoints(run):
  """Raises, naming it, for a bad `checkpoint_seconds` or `checkpoint_steps`."""
  seconds = run.checkpoint_seconds
  if (isinstance(seconds, bool)
      or not isinstance(seconds, (int, float, np.number))
      or not seconds >= 0):
    raise ValueError(
        "Invalid value for argument `checkpoint_seconds`. Expected a number "
        f">= 0. Received: checkpoint_seconds={seconds!r}")
  if run.checkpoint_steps is not None:
    options.positive_integers(checkpoint_steps=run.checkpoint_steps)


def _check_normalization(value):
  if value not in models.NORMALIZATIONS:
    raise ValueError(
        "Invalid value for argument `normalize_importance`. Expected one of "
        f"{list(models.NORMALIZATIONS)}. Received: "
        f"normalize_importance={value!r}")


@dataclasses.dataclass(frozen=True)
class SequenceRun:
  """The settings of a task-by-task run (`sequential.run_sequence`).

  Attributes:
    method: one of `sequential.METHODS` (see `keras_mas.experiments.methods`);
      `"finetune"` trains with no protection.
    strength: λ of the penalty (`lwf`: weight of the distillation term is
      1; `finetune`, `joint`: unused).
    penalty_mode: `"gradient"` or `"proximal"` (see
      `MASModel.penalty_mode`).
    epochs: epochs per task.
    batch_size: training batch size.
    learning_rate: optimizer learning rate.
    optimizer: a Keras optimizer name; a fresh one is made for each task, so
      no momentum from one task moves the weights during the next.
    model: an architecture name (see `architectures.build`), used unless
      the runner is given the user's own model.
    hidden_units: hidden width of the `mlp` and `cnn`.
    weights: local weights file for a `keras.applications` backbone, or
      None / `"none"` (random initialisation).
    freeze_backbone: keep a `keras.applications` backbone fixed.
    importance_samples: samples of each task used for importance (all if
      None).
    alpha: weight of the old importance in `online_ewc`'s decay.
    fisher: `"empirical"` (labels) or `"true"` (sampled) Fisher for EWC.
    temperature: distillation temperature of `lwf`.
    seed: seeds the model, the shuffles and every task's training.
    batch_norm: what becomes of BatchNormalization's moving statistics
      after each task, one of `batch_statistics.POLICIES`: `"recompute"`
      (default: the population statistics of the task just learned,
      measured in one forward pass over its training inputs, at most
      `importance_samples` of them), `"accumulate"` (their mean over the
      tasks so far), `"first_task"` (kept from the first task, or as a
      starting model has them) or `"keras"` (Keras's moving averages as
      training left them). Models without BatchNormalization are
      unaffected.
    lora_rank: with the user's own KerasHub task model, enable LoRA of this
      rank on its backbone (`backbone.enable_lora`) before the first task:
      only the LoRA factors and the head train, and Ω and θ* are made for
      them alone. None: no LoRA.
    normalize_importance: `MASModel.consolidate`'s `normalize`: None (Ω as
      measured, the paper) or `"mean"` / `"max"` (each task's Ω divided by
      it, so that one λ suits models whose Ω differ in scale).
    checkpoint_seconds: inside a task, write a checkpoint at the first epoch
      end at least this many seconds after the last one (0: every epoch
      end); a resume continues from it, with the same results as an
      uninterrupted run. The default costs nothing on short tasks.
    checkpoint_steps: also write one every this many training steps, inside
      an epoch (for long epochs); None: only at epoch ends.
    export: which tasks get a SavedModel under `export/task_<k>/`, one of
      `EXPORTS`: `"every_task"` (each task's model, to serve or compare),
      `"last"` (the final model only) or `"none"`. Exporting every task
      was a fifth of a short run's time (benchmarks/PEER.md).
    importance_histograms: write each task's Ω as TensorBoard histograms
      (one per variable; a long pass over a large model's parameters).

  Raises:
    ValueError: naming the setting, for an invalid value.
  """
  method: str = "mas"
  strength: float = 0.1
  penalty_mode: str = "gradient"
  epochs: int = 10
  batch_size: int = 32
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  model: str = "mlp"
  hidden_units: int = 128
  weights: str = None
  freeze_backbone: bool = False
  importance_samples: int = None
  alpha: float = 0.5
  fisher: str = "empirical"
  temperature: float = 2.0
  seed: int = 0
  batch_norm: str = "recompute"
  lora_rank: int = None
  normalize_importance: str = None
  checkpoint_seconds: float = 60.0
  checkpoint_steps: int = None
  export: str = "every_task"
  importance_histograms: bool = True

  def __post_init__(self):
    methods_lib.get(self.method)
    if self.export not in EXPORTS:
      raise ValueError(
          f"Invalid value for argument `export`. Expected one of "
          f"{list(EXPORTS)}. Received: export={self.export!r}")
    if not isinstance(self.importance_histograms, (bool, np.bool_)):
      raise ValueError(
          "Invalid value for argument `importance_histograms`. Expected a "
          "bool. Received: "
          f"importance_histograms={self.importance_histograms!r}")
    _set(self, "strength", regularizers.validate_strength(self.strength))
    if self.penalty_mode not in models.PENALTY_MODES:
      raise ValueError(
          "Invalid value for argument `penalty_mode`. Expected one of "
          f"{list(models.PENALTY_MODES)}. Received: "
          f"penalty_mode={self.penalty_mode!r}")
    options.positive_integers(epochs=self.epochs, batch_size=self.batch_size,
                              hidden_units=self.hidden_units, **{
                                  k: getattr(self, k) for k in (
                                      "lora_rank", "importance_samples")
                                  if getattr(self, k) is not None})
    options.check_optimizer(self.optimizer, self.learning_rate)
    if isinstance(self.weights, str) and self.weights.lower() == "none":
      _set(self, "weights", None)
    if isinstance(self.model, str):
      architectures.check_options(self.model, self.weights,
                                  self.freeze_backbone)
    else:
      raise ValueError(
          "Invalid value for argument `model`. Expected an architecture name "
          "(the user's own keras.Model is the runner's `model` argument). "
          f"Received: model={self.model!r}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(
          "Invalid value for argument `alpha`. Expected a number in [0, 1]. "
          f"Received: alpha={self.alpha!r}")
    if self.fisher not in ("empirical", "true"):
      raise ValueError(
          "Invalid value for argument `fisher`. Expected 'empirical' or "
          f"'true'. Received: fisher={self.fisher!r}")
    if not self.temperature > 0:
      raise ValueError(
          "Invalid value for argument `temperature`. Expected a number > 0. "
          f"Received: temperature={self.temperature!r}")
    batch_statistics.TaskStatistics(self.batch_norm)  # Raises, naming it.
    if self.normalize_importance is not None:
      _check_normalization(self.normalize_importance)
    _check_checkpoints(self)
    for name, kind in (("epochs", int), ("batch_size", int),
                       ("hidden_units", int), ("seed", int),
                       ("learning_rate", float), ("alpha", float),
                       ("temperature", float),
                       ("freeze_backbone", bool),
                       ("importance_histograms", bool)):
      _set(self, name, kind(getattr(self, name)))

  def recorded(self):
    """The settings as `results.json` records them and a resume compares
    them: timing and output options left out, unset options absent (as
    runs recorded them before these existed)."""
    kept = dataclasses.asdict(self)
    for key in _TIMING + _OUTPUTS:
      kept.pop(key)
    for key in ("lora_rank", "normalize_importance"):
      if kept[key] is None:
        kept.pop(key)
    return kept


@dataclasses.dataclass(frozen=True)
class StreamRun:
  """The settings of a task-free run (`streaming.run_stream`).

  Attributes:
    method: one of `streaming.METHODS`: `"mas"` (the detector consolidates
      on the buffer), `"mas_oracle"` (consolidates on the buffer at the
      true boundaries), `"replay"` (the buffer rehearsed, never
      consolidated), `"finetune"` (no rehearsal).
    batch_size: samples per incoming batch.
    transition_steps: blur each change over this many batches.
    buffer_size: samples in the hard buffer (all methods but `finetune`
      train on it).
    strength: λ of the MAS penalty. With the detector's defaults 0.1 did
      better than 1.0, which held the 10-class permuted tasks too stiffly
      (benchmarks/CHOICES.md).
    learning_rate: optimizer learning rate.
    optimizer: a Keras optimizer name.
    model: an architecture name (see `architectures.build`).
    hidden_units: hidden width of the `mlp` and `cnn`.
    updates_per_batch: train steps on each incoming batch.
    window: a `keras_mas.task_free.LossWindow` (None: its documented
      defaults).
    seed: seeds the model, the stream's blur and training.
    checkpoint_every: with a workdir, write a checkpoint every this many
      incoming batches (None: only when stopped).
    export_consolidations: with a workdir, also export a SavedModel at each
      consolidation.
    online_every: measure the anytime average accuracy every this many
      incoming batches (None: about 50 points along the stream).

  Raises:
    ValueError: naming the setting, for an invalid value.
  """
  method: str = "mas"
  batch_size: int = 10
  transition_steps: int = 0
  buffer_size: int = hard_buffer.DEFAULT_BUFFER_SIZE
  strength: float = 0.1
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  model: str = "mlp"
  hidden_units: int = 128
  updates_per_batch: int = 3
  window: loss_window.LossWindow = None
  seed: int = 0
  checkpoint_every: int = None
  export_consolidations: bool = False
  online_every: int = None

  def __post_init__(self):
    methods_lib.get(self.method, task_free=True)
    options.check_optimizer(self.optimizer, self.learning_rate)
    _set(self, "strength", regularizers.validate_strength(self.strength))
    for name in ("batch_size", "buffer_size", "hidden_units",
                 "updates_per_batch"):
      _set(self, name, _checks.positive_int(name, getattr(self, name)))
    for name in ("checkpoint_every", "online_every"):
      if getattr(self, name) is not None:
        _set(self, name, _checks.positive_int(name, getattr(self, name)))
    steps = self.transition_steps
    if (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
        or steps < 0):
      raise ValueError(
          "Invalid value for argument `transition_steps`. Expected an integer "
          f">= 0. Received: transition_steps={steps!r}")
    architectures.check_options(self.model)
    if self.window is None:
      _set(self, "window", loss_window.LossWindow())
    elif not isinstance(self.window, loss_window.LossWindow):
      raise ValueError(
          "Invalid value for argument `window`. Expected a "
          "keras_mas.task_free.LossWindow or None. Received: "
          f"window={self.window!r}")
    _set(self, "learning_rate", float(self.learning_rate))
    _set(self, "seed", int(self.seed))

  def recorded(self):
    """The settings that decide the result, as `results.json` records them
    and a resume compares them."""
    kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("checkpoint_every", "export_consolidations",
                              "online_every")}
    kept["window"] = self.window.get_config()
    return kept


@dataclasses.dataclass(frozen=True)
class LanguageRun:
  """The settings of a language-model run (`language.run_corpora`).

  Attributes:
    corpora: the task corpora's folders, in training order.
    method: one of `LANGUAGE_METHODS`: `"mas"` (default), `"local_mas"`,
      `"l2"` or `"finetune"` (no protection).
    strength: λ of the penalty; the default, with `normalize_importance`'s
      default, was near-best on a causal LM, an MLP and a CNN alike
      (benchmarks/STRENGTH.md).
    epochs: epochs per corpus.
    batch_size: texts per batch (training, importance and measuring).
    learning_rate: the optimizer's learning rate.
    optimizer: a Keras optimizer name; a fresh one for each corpus.
    lora_rank: enable LoRA of this rank on the backbone before the first
      corpus (only the factors train; Ω and θ* are theirs); None: the
      whole model trains.
    sequence_length: tokens per text (the preprocessor's, changed for the
      run); None keeps the model's.
    importance_samples: texts of each corpus importance is measured on
      (all if None).
    normalize_importance: `MASModel.consolidate`'s `normalize`: `"mean"`
      (default: each corpus's Ω divided by its mean, so that λ does not
      follow the vocabulary and the tokens summed), `"max"` or None (Ω as
      measured, the paper).
    generate_length: tokens of the sample generated from each corpus's
      first held-out text after each task (0: none).
    seed: seeds the splits, the shuffles and the training.
    checkpoint_seconds: inside a corpus, checkpoint at the first epoch end
      this many seconds after the last checkpoint (0: every epoch end).
    checkpoint_steps: also checkpoint every this many training steps.

  Raises:
    ValueError: naming the setting, for an invalid value.
  """
  corpora: tuple
  method: str = "mas"
  strength: float = 0.1
  epochs: int = 3
  batch_size: int = 8
  learning_rate: float = 1e-4
  optimizer: str = "adam"
  lora_rank: int = None
  sequence_length: int = None
  importance_samples: int = None
  normalize_importance: str = "mean"
  generate_length: int = 32
  seed: int = 0
  checkpoint_seconds: float = 60.0
  checkpoint_steps: int = None

  def __post_init__(self):
    _set(self, "corpora", tuple(self.corpora))
    if not self.corpora:
      raise ValueError("Invalid value for argument `corpora`. Expected one "
                       "corpus folder or more. Received: none")
    if self.method not in LANGUAGE_METHODS:
      raise ValueError(
          "Invalid value for argument `method`. Expected one of "
          f"{list(LANGUAGE_METHODS)} for a language model. Received: "
          f"method={self.method!r}")
    _set(self, "strength", regularizers.validate_strength(self.strength))
    options.positive_integers(epochs=self.epochs, batch_size=self.batch_size,
                              **{k: getattr(self, k) for k in (
                                  "lora_rank", "sequence_length",
                                  "importance_samples")
                                 if getattr(self, k) is not None})
    options.check_optimizer(self.optimizer, self.learning_rate)
    _check_normalization(self.normalize_importance)
    if self.generate_length != 0:
      options.positive_integers(generate_length=self.generate_length)
    _check_checkpoints(self)

  def recorded(self):
    """The settings a resume must match (timing options may change)."""
    kept = dataclasses.asdict(self)
    for key in _TIMING:
      kept.pop(key)
    kept["corpora"] = [os.path.abspath(c) for c in self.corpora]
    return kept
