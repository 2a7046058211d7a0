r"""Learns a sequence of tasks one after another, with MAS or without.

  python apps/sequential_finetune.py --workdir=/tmp/mas
  python apps/sequential_finetune.py --method=finetune --workdir=/tmp/ft
  python apps/sequential_finetune.py --task_spec=examples/task_spec.py \
      --scenario=task --workdir=/tmp/spec    # TFRecords, streamed
  python apps/sequential_finetune.py --init_model=/presets/gemma3 \
      --task_dirs=/data/news,/data/recipes --lora_rank=8 --workdir=/tmp/lm
  tensorboard --logdir=/tmp

With a KerasHub causal LM as --init_model, each of --task_dirs is a text
corpus (.txt files, or .jsonl prompt and response pairs) and the table is
each corpus's next-token loss and perplexity (keras_mas.experiments.language).

Writes results.json, TensorBoard logs, a checkpoint and a SavedModel (a
causal LM: a KerasHub preset) per task into --workdir; --resume continues
an interrupted run. A bad flag stops the app before training with one line
naming it (exit status 1). SIGTERM or SIGINT stops it after the training
step under way, keeping its last checkpoint (exit status 75; --resume
continues).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
# First: the log level, and a faster Keras import.
if __package__:  # Installed (keras_mas_apps), or `python -m apps.<app>`.
  from . import app_startup
else:  # Run as a file: its folder is first on sys.path.
  import app_startup
import keras

from keras_mas.core import model_parallel
from keras_mas.data import corpora
from keras_mas.data import sources
from keras_mas.data import tasks
from keras_mas.experiments import checkpoints
from keras_mas.experiments import cli
from keras_mas.experiments import language
from keras_mas.experiments import methods
from keras_mas.experiments import preemption
from keras_mas.experiments import sequential as training
from keras_mas.experiments import streaming

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_DATASET = flags.DEFINE_string(
    "dataset", "digits",
    "'digits' (bundled), 'fashion_mnist' (offline from Debian's "
    "dataset-fashion-mnist when installed, else TFDS), 'idx:DIR' (an "
    "MNIST-format directory) or a TFDS name; comma-separated for "
    "--recipe=datasets.")
_TASK_DIRS = flags.DEFINE_list(
    "task_dirs", None,
    "The user's tasks: folders of images or of .txt files, one per task "
    "(one folder: the --init_model plus one new task), each with one "
    "subfolder per class (optionally train/ and test/); replaces "
    "--dataset/--recipe. With a causal LM --init_model: text corpora, "
    "folders of .txt files or of .jsonl lines {\"prompt\": ..., "
    "\"response\": ...}.")
_SEQUENCE_LENGTH = flags.DEFINE_integer(
    "sequence_length", None, "A causal LM --init_model: tokens per text "
    "(default: its preprocessor's).", lower_bound=1)
_GENERATE_LENGTH = flags.DEFINE_integer(
    "generate_length", 32, "A causal LM --init_model: tokens generated from "
    "each corpus after each task, shown in TensorBoard (0: none).",
    lower_bound=0)
_TASK_SPEC = flags.DEFINE_string(
    "task_spec", None,
    "The user's tasks as tf.data pipelines or TFRecord files, streamed: a "
    "Python file defining task_spec() (see keras_mas.data.sources.read_task_spec "
    "and examples/task_spec.py); replaces --dataset/--recipe.")
_IMAGE_SIZE = flags.DEFINE_list(
    "image_size", None, "HEIGHT,WIDTH images of --task_dirs are resized to; "
    "default: --init_model's input size.")
_INIT_MODEL = flags.DEFINE_string(
    "init_model", None, "Start from this trained model instead of --model: "
    "a .keras file (its weights, input size and outputs) or a KerasHub "
    "preset directory holding a task model (a TextClassifier, "
    "ImageClassifier, ...), whose preprocessor then takes the raw data.")
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank", None, "With a KerasHub --init_model: train LoRA factors of "
    "this rank (and the head) instead of the whole backbone.", lower_bound=1)
_IMPORTANCE_DATA = flags.DEFINE_string(
    "importance_data", None,
    "Data --init_model was deployed on, to measure importance on before the "
    "new tasks: an image folder (class subfolders give labels, and the "
    "report shows accuracy on it before and after), or a source name "
    "('fashion_mnist', 'idx:DIR', ...: its test split).")
_RECIPE = flags.DEFINE_enum("recipe", "permuted", list(tasks.RECIPES),
                            "How tasks are made from the dataset.")
_SCENARIO = flags.DEFINE_enum("scenario", "domain", list(tasks.SCENARIOS),
                              "task-, domain- or class-incremental.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 5, "Number of tasks.",
                                   lower_bound=1)
_METHOD = flags.DEFINE_enum(
    "method", "mas", list(methods.METHODS),
    "Continual-learning method; with --task_boundaries=none one of "
    f"{list(streaming.METHODS)} ('replay': the hard buffer alone; "
    "'mas_oracle': MAS consolidating at the true task changes).")
_TASK_BOUNDARIES = flags.DEFINE_enum(
    "task_boundaries", "given", ["given", "none"],
    "'given': each task is learned with its own fit and consolidated after "
    "it; 'none': the tasks become one stream of small batches and the "
    "learner is never told where a task ends (task-free MAS, CVPR 2019).")
_STREAM_BATCH_SIZE = flags.DEFINE_integer(
    "stream_batch_size", 10, "--task_boundaries=none: samples per incoming "
    "batch.", lower_bound=1)
_TRANSITION_STEPS = flags.DEFINE_integer(
    "transition_steps", 0, "--task_boundaries=none: blur each change of "
    "task over this many batches.", lower_bound=0)
_BUFFER_SIZE = flags.DEFINE_integer(
    "buffer_size", streaming.DEFAULT_BUFFER_SIZE, "--task_boundaries=none: "
    "samples in the hard buffer rehearsed with each batch.", lower_bound=1)
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", None, "--task_boundaries=none: checkpoint the "
    "stream every this many batches (for --resume).", lower_bound=1)
_EXPORT_CONSOLIDATIONS = flags.DEFINE_bool(
    "export_consolidations", False, "--task_boundaries=none: also export a "
    "SavedModel at each consolidation (export_consolidations/step_N/).")
_STRENGTH = flags.DEFINE_float(
    "strength", 0.1, "λ, the MAS penalty strength (0.1 suits the default "
    "permuted-digits sequence; see docs/guides/baselines-and-lambda.md).")
_NORMALIZE_IMPORTANCE = flags.DEFINE_enum(
    "normalize_importance", "none", ["none", "mean", "max"],
    "Each task's Ω divided by its mean ('mean') or largest entry ('max') "
    "over the protected weights, so that one --strength suits models whose "
    "Ω differ in scale; 'none': Ω as measured (the paper). A causal LM "
    "--init_model takes 'mean' (and --strength=0.1) unless given.")
_PENALTY = flags.DEFINE_enum(
    "penalty", "gradient", ["gradient", "proximal"],
    "'gradient': the penalty's gradient enters the optimizer step (paper); "
    "'proximal': an exact implicit step on it, stable at any strength.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs per task.",
                                lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.",
                                    lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3,
                                    "Learning rate, > 0.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adam", "Keras optimizer name.")
_MODEL = flags.DEFINE_string(
    "model", "mlp", "'mlp', 'cnn' or a keras.applications model name in any "
    "case (e.g. mobilenetv2): inputs are resized and given 3 channels inside "
    "the model.")
_HIDDEN_UNITS = flags.DEFINE_integer("hidden_units", 128, "Hidden width.",
                                     lower_bound=1)
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Local weights file for a keras.applications backbone "
    "(include_top=False); 'none' or unset: random initialisation.")
_FREEZE_BACKBONE = flags.DEFINE_bool(
    "freeze_backbone", False, "Keep a keras.applications backbone's weights "
    "fixed; only the classifier trains.")
_BATCH_NORM = flags.DEFINE_enum(
    "batch_norm", "recompute", ["recompute", "accumulate", "first_task",
                                "keras"],
    "BatchNormalization's moving statistics after each task: 'recompute' "
    "(the population statistics of the task just learned, from its training "
    "data), 'accumulate' (their mean over the tasks so far), 'first_task' "
    "(kept from the first task, or --init_model's), 'keras' (as training "
    "left them).")
_IMPORTANCE_SAMPLES = flags.DEFINE_integer(
    "importance_samples", None, "Samples per task for importance (all if "
    "unset).", lower_bound=1)
_ALPHA = flags.DEFINE_float(
    "alpha", 0.5, "online_ewc: weight of the old importance in its decay.")
_FISHER = flags.DEFINE_enum("fisher", "empirical", ["empirical", "true"],
                            "ewc, online_ewc: Fisher from labels or sampled.")
_TEMPERATURE = flags.DEFINE_float("temperature", 2.0,
                                  "lwf: distillation temperature.")
_MAX_ANGLE = flags.DEFINE_float("max_angle", 90.0,
                                "Rotation of the last task, --recipe=rotated.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_TFDS_SPLITS = flags.DEFINE_list(
    "tfds_splits", None, "TRAIN,TEST split names of a TFDS --dataset in "
    "TFDS's syntax, e.g. 'train[:20%],test' (default: train,test).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)
_RESUME = flags.DEFINE_bool("resume", False,
                            "Continue the run in --workdir.")
_CHECKPOINT_SECONDS = flags.DEFINE_float(
    "checkpoint_seconds", 60.0, "Inside a task, checkpoint at the first epoch "
    "end at least this many seconds after the last checkpoint (0: every "
    "epoch end); --resume continues from it.", lower_bound=0.0)
_CHECKPOINT_STEPS = flags.DEFINE_integer(
    "checkpoint_steps", None, "Inside a task, also checkpoint every this many "
    "training steps (for long epochs).", lower_bound=1)
_EXPORT = flags.DEFINE_enum(
    "export", "every_task", ["every_task", "last", "none"],
    "SavedModels under --workdir/export/: one per task, the last task's "
    "only, or none.")
_IMPORTANCE_HISTOGRAMS = flags.DEFINE_bool(
    "importance_histograms", True,
    "Write each task's importance as TensorBoard histograms.")
_DISTRIBUTION = flags.DEFINE_enum(
    "distribution", "none", ["none", "mirrored", "multi_worker"],
    "tf.distribute strategy: 'mirrored' over this machine's devices, or "
    "'multi_worker' across the machines named in TF_CONFIG.")
_VIRTUAL_CPUS = flags.DEFINE_integer(
    "virtual_cpus", 0,
    "Split the CPU into this many logical devices (to run 'mirrored' with "
    "several replicas on a machine without accelerators).", lower_bound=0)
_MESH = flags.DEFINE_list(
    "mesh", None,
    "On KERAS_BACKEND=jax, train under Keras's ModelParallel: the device "
    "mesh's shape as data,model (e.g. 2,4: two copies of the model, each "
    "split over 4 devices; 1,8: one copy split over 8). The product is the "
    "number of devices. Weights, optimizer state, Ω and θ* are laid out by "
    "the layout map of --init_model's KerasHub backbone where it has one "
    "(Gemma, Llama, Qwen), else by keras_mas.core.model_parallel's rule.")
_MESH_AXES = flags.DEFINE_list(
    "mesh_axes", ["batch", "model"],
    "Names of the --mesh axes, data axis first.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None,
    "Run --mesh (a classifier's run) over several processes (on one "
    "machine or several): "
    "process 0's host:port. Every process of the run gets the same flags, "
    "--coordinator and --num_processes included, and its own --process_id; "
    "the mesh spans all their devices. Every process reads --workdir (on "
    "--resume); process 0 alone writes it.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "The number of processes of a --coordinator run.",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", 0, "This process's number in a --coordinator run, from 0 "
    "to --num_processes - 1 (0 writes --workdir).", lower_bound=0)
_VERBOSE = flags.DEFINE_integer("verbose", 1, "0: quiet, 1: progress.")


def _main():
  logging.set_verbosity(logging.WARNING)
  if _COORDINATOR.value:
    cli.supervised()  # Returns in the child, which does the work.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if _VIRTUAL_CPUS.value:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * _VIRTUAL_CPUS.value)
  # Made first: a multi-worker strategy must exist before other TF work.
  strategy = {
      "none": lambda: None,
      "mirrored": tf.distribute.MirroredStrategy,
      "multi_worker": tf.distribute.MultiWorkerMirroredStrategy,
  }[_DISTRIBUTION.value]()
  tf.config.experimental.enable_op_determinism()
  _check_workdir()
  _join_processes()
  distribution = _distribution() if _MESH.value else None
  init_model = None
  if _INIT_MODEL.value:
    init_model = _load_init_model(distribution)
  if _is_causal_lm(init_model):
    _stoppable(lambda stop: _run_corpora(init_model, stop))
    return
  _refuse_corpora()
  if _TASK_SPEC.value and _TASK_DIRS.value:
    raise ValueError(
        "Invalid value for argument `task_spec`. Expected either --task_spec "
        "or --task_dirs. Received: both")
  image_size, channels = _image_size(init_model)
  if _TASK_SPEC.value:
    sequence = tasks.from_spec(_TASK_SPEC.value, scenario=_SCENARIO.value)
  elif _TASK_DIRS.value:
    sequence = tasks.from_folders(_TASK_DIRS.value, image_size,
                                  scenario=_SCENARIO.value, channels=channels,
                                  seed=_SEED.value)
  else:
    sequence = tasks.make_sequence(
        _DATASET.value, _RECIPE.value, _SCENARIO.value, _NUM_TASKS.value,
        seed=_SEED.value, max_angle=_MAX_ANGLE.value,
        data_dir=_DATA_DIR.value, splits=_TFDS_SPLITS.value)
  if _TASK_BOUNDARIES.value == "none":
    _stream(sequence)
    return
  methods.get(_METHOD.value, task_free=False)  # Raises, naming the flag.
  importance_data = None
  if _IMPORTANCE_DATA.value:
    importance_data = sources.load_importance_data(
        _IMPORTANCE_DATA.value, sequence.input_shape, seed=_SEED.value,
        data_dir=_DATA_DIR.value)
  try:
    _stoppable(lambda stop: _run_sequence(
        sequence, init_model, importance_data, strategy, stop))
  except ValueError as e:
    if init_model is None or "argument `model`" not in str(e):
      raise
    # The library's `model` is the user's --init_model here.
    raise ValueError(str(e).replace("argument `model`",
                                    "argument `init_model`")) from e


def _join_processes():
  """--coordinator: joins the run's other processes before any JAX work."""
  if not (_COORDINATOR.value or _NUM_PROCESSES.value > 1
          or _PROCESS_ID.value):
    return
  given = (f"--coordinator={_COORDINATOR.value} --num_processes="
           f"{_NUM_PROCESSES.value} --process_id={_PROCESS_ID.value}")
  if not _COORDINATOR.value or _NUM_PROCESSES.value < 2:
    raise ValueError(
        "Invalid value for argument `coordinator`. Expected process 0's "
        "host:port and --num_processes of 2 or more together. Received: "
        + given)
  if _PROCESS_ID.value >= _NUM_PROCESSES.value:
    raise ValueError(
        "Invalid value for argument `process_id`. Expected 0 to "
        f"--num_processes - 1. Received: {given}")
  if not _MESH.value or keras.backend.backend() != "jax":
    raise ValueError(
        "Invalid value for argument `coordinator`. Expected --mesh on "
        "KERAS_BACKEND=jax (processes share one device mesh). Received: "
        f"{given} with --mesh={','.join(_MESH.value or []) or None} on "
        f"{keras.backend.backend()}")
  keras.distribution.initialize(job_addresses=_COORDINATOR.value,
                                num_processes=_NUM_PROCESSES.value,
                                process_id=_PROCESS_ID.value)


def _distribution():
  """--mesh: Keras's ModelParallel, set before any variable is made."""
  if _DISTRIBUTION.value != "none":
    raise ValueError(
        "Invalid value for argument `mesh`. Expected either --mesh "
        "(keras.distribution, JAX) or --distribution (tf.distribute). "
        f"Received: --mesh={','.join(_MESH.value)} and "
        f"--distribution={_DISTRIBUTION.value}")
  try:
    shape = [int(size) for size in _MESH.value]
  except ValueError as e:
    raise ValueError(
        "Invalid value for argument `mesh`. Expected integers data,model "
        f"(e.g. 2,4). Received: --mesh={','.join(_MESH.value)}") from e
  backbone = (sources.preset_backbone_class(_INIT_MODEL.value)
              if _INIT_MODEL.value and os.path.isdir(_INIT_MODEL.value)
              else None)
  distribution = model_parallel.make_distribution(
      shape, _MESH_AXES.value,
      layout_map=model_parallel.layout_map_of(backbone, _MESH_AXES.value))
  keras.distribution.set_distribution(distribution)
  return distribution


def _load_init_model(distribution):
  """--init_model, laid out by `distribution` (None: on one device)."""
  try:
    model = sources.load_model(_INIT_MODEL.value)
  except ValueError as e:
    if distribution is None or "evenly divide" not in str(e):
      raise
    raise ValueError(
        "Invalid value for argument `mesh`. Expected a model axis that "
        "divides the sharded axes of --init_model's weights (e.g. its "
        f"attention heads). Received: --mesh={','.join(_MESH.value)}: "
        f"{str(e)[-300:]}") from e
  if isinstance(distribution, keras.distribution.ModelParallel) and (
      not isinstance(distribution, model_parallel.RuleModelParallel)):
    model_parallel.check_layout_map(
        distribution._layout_map, model)  # pylint: disable=protected-access
  return model


def _stoppable(run):
  """`run(stop)` under SIGTERM/SIGINT handling: a stop is one line and the
  documented exit status."""
  stop = preemption.StopRequest()
  try:
    with preemption.on_signals(stop):
      run(stop)
  except preemption.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


# The SequenceRun setting each flag fills.
_SEQUENCE_FLAGS = {
    "method": _METHOD, "strength": _STRENGTH, "penalty_mode": _PENALTY,
    "epochs": _EPOCHS, "batch_size": _BATCH_SIZE,
    "learning_rate": _LEARNING_RATE, "optimizer": _OPTIMIZER,
    "model": _MODEL, "hidden_units": _HIDDEN_UNITS, "weights": _WEIGHTS,
    "freeze_backbone": _FREEZE_BACKBONE,
    "importance_samples": _IMPORTANCE_SAMPLES, "alpha": _ALPHA,
    "fisher": _FISHER, "temperature": _TEMPERATURE, "seed": _SEED,
    "batch_norm": _BATCH_NORM, "lora_rank": _LORA_RANK,
    "checkpoint_seconds": _CHECKPOINT_SECONDS,
    "checkpoint_steps": _CHECKPOINT_STEPS,
    "export": _EXPORT, "importance_histograms": _IMPORTANCE_HISTOGRAMS,
}


def _run_sequence(sequence, init_model, importance_data, strategy, stop):
  run = training.SequenceRun(
      normalize_importance=_normalization(),
      **{name: flag.value for name, flag in _SEQUENCE_FLAGS.items()})
  training.run_sequence(
      sequence, _WORKDIR.value, run, model=init_model,
      importance_data=importance_data, resume=_RESUME.value,
      strategy=strategy, stop=stop, verbose=_VERBOSE.value,
      extra={"flags": _flag_values()})


def _is_causal_lm(model):
  hub = sys.modules.get("keras_hub")
  return hub is not None and isinstance(model, hub.models.CausalLM)


# The settings LanguageRun takes from flags the user gave (its own defaults
# suit a language model otherwise).
_LANGUAGE_FLAGS = {
    "method": _METHOD, "strength": _STRENGTH, "epochs": _EPOCHS,
    "batch_size": _BATCH_SIZE, "learning_rate": _LEARNING_RATE,
    "optimizer": _OPTIMIZER, "lora_rank": _LORA_RANK,
    "sequence_length": _SEQUENCE_LENGTH,
    "importance_samples": _IMPORTANCE_SAMPLES,
    "generate_length": _GENERATE_LENGTH, "seed": _SEED,
    "checkpoint_seconds": _CHECKPOINT_SECONDS,
    "checkpoint_steps": _CHECKPOINT_STEPS,
}
_CLASSIFIER_FLAGS = (
    _DATASET, _TASK_SPEC, _IMAGE_SIZE, _RECIPE, _SCENARIO, _NUM_TASKS,
    _TASK_BOUNDARIES, _MODEL, _HIDDEN_UNITS, _WEIGHTS, _FREEZE_BACKBONE,
    _BATCH_NORM, _PENALTY, _ALPHA, _FISHER, _TEMPERATURE, _MAX_ANGLE,
    _DATA_DIR, _TFDS_SPLITS, _DISTRIBUTION, _VIRTUAL_CPUS, _EXPORT,
    _IMPORTANCE_HISTOGRAMS)


def _normalization():
  value = _NORMALIZE_IMPORTANCE.value
  return None if value == "none" else value


def _run_corpora(lm, stop):
  """A causal LM --init_model: --task_dirs are text corpora."""
  given = [f"--{f.name}" for f in _CLASSIFIER_FLAGS
           if flags.FLAGS[f.name].present]
  if given:
    raise ValueError(
        f"Invalid value for argument `{given[0][2:]}`. Expected only the "
        "flags of a language-model run with a causal LM --init_model. "
        f"Received: {given}")
  if not _TASK_DIRS.value:
    raise ValueError(
        "Invalid value for argument `task_dirs`. Expected the text corpora "
        "for the causal LM --init_model. Received: none")
  if _NUM_PROCESSES.value > 1:
    # Not yet: over two processes the run finishes, but its loss matrix
    # differs from one process's on the same mesh by about 1 % after the
    # first corpus's fit (docs/guides/several-devices.md), unexplained.
    raise ValueError(
        "Invalid value for argument `coordinator`. Expected a classifier's "
        "run: a causal LM --init_model trains on one process's devices "
        f"(--mesh without --coordinator). Received: --coordinator="
        f"{_COORDINATOR.value} with --init_model={_INIT_MODEL.value}")
  given = {name: flag.value for name, flag in _LANGUAGE_FLAGS.items()
           if flags.FLAGS[flag.name].present}
  if _NORMALIZE_IMPORTANCE.present:
    given["normalize_importance"] = _normalization()
  run = language.LanguageRun(corpora=_TASK_DIRS.value, **given)
  language.run_corpora(
      run, lm, _WORKDIR.value, importance_corpus=_IMPORTANCE_DATA.value,
      resume=_RESUME.value, stop=stop, verbose=_VERBOSE.value,
      extra={"flags": _flag_values()})


def _refuse_corpora():
  """Language-model flags and corpora need a causal LM --init_model."""
  for flag in (_SEQUENCE_LENGTH, _GENERATE_LENGTH):
    if flag.present:
      raise ValueError(
          f"Invalid value for argument `{flag.name}`. Expected it with a "
          "KerasHub causal LM --init_model. Received: "
          f"--{flag.name}={flag.value} with "
          + (f"--init_model={_INIT_MODEL.value}" if _INIT_MODEL.value else
             "no --init_model"))
  for folder in _TASK_DIRS.value or ():
    if corpora.is_corpus(folder):
      raise ValueError(
          "Invalid value for argument `task_dirs`. Expected class subfolders "
          "(a classifier's task), or a KerasHub causal LM --init_model for "
          f"text corpora. Received: {folder!r}, a corpus of .txt/.jsonl "
          "files, with " + (f"--init_model={_INIT_MODEL.value}"
                            if _INIT_MODEL.value else "no --init_model"))


def _stream(sequence):
  """--task_boundaries=none: the sequence as one stream, task-free."""
  unsupported = [f"--{f.name}" for f in (
      _INIT_MODEL, _IMPORTANCE_DATA, _WEIGHTS, _IMPORTANCE_SAMPLES,
      _LORA_RANK, _MESH) if f.value]
  if _DISTRIBUTION.value != "none":
    unsupported.append("--distribution")
  if _normalization():
    unsupported.append("--normalize_importance")
  if unsupported:
    raise ValueError(
        "Invalid value for argument `task_boundaries`. Expected given task "
        f"boundaries with {unsupported}. Received: task_boundaries='none'")
  methods.get(_METHOD.value, task_free=True)  # Raises, naming the flag.
  run = streaming.StreamRun(
      method=_METHOD.value, batch_size=_STREAM_BATCH_SIZE.value,
      transition_steps=_TRANSITION_STEPS.value,
      buffer_size=_BUFFER_SIZE.value, strength=_STRENGTH.value,
      learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
      model=_MODEL.value, hidden_units=_HIDDEN_UNITS.value, seed=_SEED.value,
      checkpoint_every=_CHECKPOINT_EVERY.value,
      export_consolidations=_EXPORT_CONSOLIDATIONS.value)
  results = {}
  _stoppable(lambda stop: results.update(streaming.run_stream(
      sequence, run, workdir=_WORKDIR.value, stop=stop, resume=_RESUME.value,
      verbose=_VERBOSE.value)))
  if _VERBOSE.value:
    print(training.format_matrix(results))


def _check_workdir():
  """A workdir holding a run needs --resume: say so in the flags' words."""
  if _RESUME.value or _TASK_BOUNDARIES.value == "none":
    return
  checkpoint = checkpoints.latest(_WORKDIR.value)
  in_task = checkpoints.latest_in_task(_WORKDIR.value)
  if checkpoint is None and in_task is None:
    return
  finished = os.path.isfile(os.path.join(_WORKDIR.value, "results.json"))
  raise ValueError(
      "Invalid value for argument `workdir`. Expected a new directory, or "
      "--resume to continue the run in it. Received: "
      f"--workdir={_WORKDIR.value} holding "
      + ("a finished run: add --resume to see its results, or choose a new "
         "--workdir" if finished else
         "a run stopped " + (f"inside task {in_task[0]}" if in_task else
                             f"after task {checkpoint[0]}")
         + ": add --resume to continue it, or choose a new --workdir"))


def _image_size(init_model):
  """`(height, width)` and channels for --task_dirs, from flags or model."""
  if getattr(init_model, "preprocessor", None) is not None:
    # The model's preprocessor takes the raw data (text, or images of any
    # size it resizes).
    fixed = None
  else:
    fixed = tuple(init_model.inputs[0].shape[1:]) if init_model else None
  if _IMAGE_SIZE.value:
    try:
      size = tuple(int(v) for v in _IMAGE_SIZE.value)
    except ValueError:
      size = ()
    if len(size) == 1:
      size = size * 2
    if len(size) != 2 or min(size) < 1:
      raise ValueError(
          "Invalid value for argument `image_size`. Expected HEIGHT,WIDTH "
          f"(or one side). Received: image_size={_IMAGE_SIZE.value!r}")
    if fixed and None not in fixed[:2] and size != fixed[:2]:
      raise ValueError(
          f"Invalid value for argument `image_size`. Expected the "
          f"--init_model's input size {fixed[:2]}. Received: "
          f"image_size={size}")
  elif fixed and len(fixed) == 3 and None not in fixed[:2]:
    size = fixed[:2]
  elif _TASK_DIRS.value and getattr(init_model, "preprocessor", None) is None:
    raise ValueError(
        "Invalid value for argument `image_size`. Expected HEIGHT,WIDTH for "
        "--task_dirs when no --init_model fixes it. Received: none")
  else:
    size = None
  channels = fixed[2] if fixed and len(fixed) == 3 and fixed[2] else 3
  return size, channels


main = cli.main_with_one_line_errors(_main)

# This app's flags, recorded with the results (however it was started: a
# file, `python -m`, a console script).
_OWN_FLAGS = [v for v in tuple(globals().values())
              if isinstance(v, flags.FlagHolder)]


def _flag_values():
  return {f.name: f.value for f in _OWN_FLAGS}


def run():
  """The console script's entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
