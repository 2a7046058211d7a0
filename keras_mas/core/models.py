"""MASModel: a keras.Model that owns MAS importance and anchors."""

import contextlib

import keras
from keras.src import backend as keras_backend
from keras.src.models.functional import Functional
from keras.src.trainers.data_adapters import tf_dataset_adapter
import numpy as np
import tensorflow as tf

from keras_mas import _backend
from keras_mas import importance as importance_lib
from keras_mas.core import callbacks as callbacks_lib
from keras_mas.core import exact_state
from keras_mas.core import multi_process
from keras_mas.core import multi_worker
from keras_mas.core import path_integral as path_integral_lib
from keras_mas.core import penalty as penalty_lib
from keras_mas.core import preprocessing
from keras_mas.core import regularizers
from keras_mas.core import scalar_mean
from keras_mas.core import trainer

__all__ = ["MASModel", "FunctionalMASModel", "WrappedMASModel", "ESTIMATORS"]

ESTIMATORS = importance_lib.ESTIMATORS

_ACCUMULATE = ("sum", "decay")
# `consolidate(normalize=...)`: what Ω_new is divided by (None: nothing).
NORMALIZATIONS = (None, "mean", "max")
PENALTY_MODES = penalty_lib.PENALTY_MODES

# The backend is fixed when Keras is imported. Every backend runs
# `keras_mas.core.trainer`'s step; JAX's stateless trainer through
# `keras_mas.core._jax_trainer`. `tf.distribute` is TensorFlow's alone.
_JAX = _backend.JAX
_TF = _backend.TENSORFLOW
if _JAX:
  # pylint: disable-next=g-import-not-at-top
  from keras_mas.core import _jax_trainer


class _MASState:
  """Ω, θ* and their regularizers, one each per tracked trainable variable.

  A plain object, so Keras does not track the variables listed here a second
  time; the Ω and θ* variables themselves are weights of the model.
  """

  def __init__(self, targets, importances, anchors, strength, tasks,
               proximal):
    self.targets = targets
    self.importances = importances
    self.anchors = anchors
    self.strength = strength
    self.tasks = tasks
    self.proximal = proximal
    self.regularizers = [
        regularizers.MASRegularizer(strength, omega, anchor)
        for omega, anchor in zip(importances, anchors)
    ]


@keras.saving.register_keras_serializable(package="keras_mas")
class MASModel(keras.Model):
  """A `keras.Model` that remembers what earlier tasks needed.

  Build it like any functional model, subclass it like `keras.Model`, or turn
  an existing model into one with `MASModel.from_model`. After training a
  task, `consolidate` measures each parameter's importance Ω on data (labels
  not needed) and anchors θ* to the current weights. From then on `fit`
  minimises `task loss + λ Σ Ω (θ − θ*)²`, reported as `loss`, with its two
  parts also logged as the metrics `task_loss` and `mas_penalty`.

  Ω, θ*, λ and the number of consolidated tasks are non-trainable variables
  of the model, created once when the model is built: the variable list does
  not change across tasks, and `.keras` files and checkpoints keep them.
  λ is 1.0 until set, by `consolidate(..., strength=λ)` or `model.strength`.

  Training that diverges stops: `fit` adds a
  `keras_mas.core.callbacks.DivergenceGuard` (unless its `callbacks` have one),
  which, when the loss or a weight becomes NaN or infinite, restores the
  weights of the start of that epoch and raises `TrainingDivergedError`
  naming λ and, for SGD, the largest stable λ. Set
  `model.stop_on_divergence = False` to train on regardless.

  Saving: `model.save("m.keras")` keeps everything; `import keras_mas`
  before `keras.models.load_model` (Keras imports no other package to find
  a class). A subclass of `MASModel` needs, as any subclassed Keras model,
  `@keras.saving.register_keras_serializable()` and a `get_config`.

  Example:

  ```python
  inputs = keras.Input((64,))
  hidden = keras.layers.Dense(128, activation="relu")(inputs)
  model = keras_mas.MASModel(inputs, keras.layers.Dense(10)(hidden))
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"])
  model.fit(x_a, y_a, epochs=5)
  model.consolidate(x_a, strength=1.0)
  model.fit(x_b, y_b, epochs=5)  # logs loss, task_loss, mas_penalty, ...
  ```
  """

  # The penalty mode as the traced train step reads it; `penalty_mode`'s
  # setter and loading keep it in step with the saved variable.
  _proximal = False

  def __new__(cls, *args, **kwargs):
    if _functional_init_arguments(args, kwargs) and not issubclass(
        cls, Functional):
      if cls is not MASModel:
        # Keras would splice `Functional` into the bases of `cls` and of
        # every parent, MASModel included, breaking subclassed MASModels.
        raise TypeError(
            f"{cls.__name__} is a subclassed MASModel and cannot be built "
            "from `inputs` and `outputs`. Subclass "
            "keras_mas.FunctionalMASModel for a functional model.")
      return super().__new__(FunctionalMASModel)
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._init_mas()

  def _init_mas(self):
    self.task_loss_tracker = scalar_mean.ScalarMean(name="task_loss")
    self.penalty_tracker = scalar_mean.ScalarMean(name="mas_penalty")
    self._mas = None
    self._si_path = None
    self._stop_on_divergence = True
    self._penalty_log_interval = 1
    # Not tracked by Keras: a buffer is the stream's state, not the model's.
    object.__setattr__(self, "_rehearsal", None)
    # LoRA factors and seed states, which Keras's saving changes or drops:
    # saved and loaded by Keras as a private entry, after the layers.
    object.__setattr__(self, "_exact_state", exact_state.ExactState(self))
    if self.built:
      self._ensure_mas_state()

  @classmethod
  def from_model(cls, model, name=None):
    """Returns a MASModel computing what `model` computes, sharing its weights.

    Functional and Sequential models become a functional MASModel over the
    same layers; subclassed models, and models with a `preprocessor` (a
    KerasHub task: `TextClassifier`, `CausalLM`, `ImageClassifier`, ...),
    are wrapped. A wrapped model's preprocessor is applied as the task
    applies it: `fit`, `evaluate`, `predict` and `consolidate` take the raw
    inputs the task takes (strings, images). No weight is copied: training
    the result trains `model`'s layers. A KerasHub backbone's LoRA
    (`backbone.enable_lora(rank)`) must be enabled before: Ω and θ* are
    then made for the trainable variables only (the LoRA factors and the
    head). To save the result of a subclassed
    `model`, its class needs what any subclassed Keras model needs:
    `@keras.saving.register_keras_serializable()` and a `get_config`.

    Args:
      model: a built `keras.Model`.
      name: the new model's name; defaults to `model.name`.

    Returns:
      A `MASModel`.

    Raises:
      ValueError: if `model` is not a built `keras.Model`.
    """
    if not isinstance(model, keras.Model):
      raise ValueError(
          "Invalid value for argument `model`. Expected a `keras.Model`. "
          f"Received: model of type {type(model).__name__}"
      )
    if isinstance(model, MASModel):
      return model
    if not model.built:
      raise ValueError(
          "Invalid value for argument `model`. Expected a built model: call "
          "it on a batch of data or `model.build(input_shape)` first. "
          f"Received: unbuilt model '{model.name}'"
      )
    name = name or model.name
    if getattr(model, "preprocessor", None) is None and _is_plain_graph(model):
      return cls(inputs=model.inputs, outputs=model.outputs, name=name)
    # Subclassed, holding a preprocessor, or a class with its own config (a
    # KerasHub task): wrapped, so that the model is saved and rebuilt by its
    # own class.
    return WrappedMASModel(model, name=name)  # pylint: disable=undefined-variable

  # ------------------------------------------------------------------------
  # State.

  def _ensure_mas_state(self):
    if self._mas is not None or not self.built:
      return
    targets = list(self.trainable_variables)
    with self._adding_state():
      strength = self.add_weight(
          shape=(), dtype="float32", initializer="ones", trainable=False,
          name="mas_strength")
      tasks = self.add_weight(
          shape=(), dtype="int32", initializer="zeros", trainable=False,
          name="mas_consolidated_tasks")
      proximal = self.add_weight(
          shape=(), dtype="int32", initializer="zeros", trainable=False,
          name="mas_proximal")
      importances, anchors = [], []
      for i, v in enumerate(targets):
        importances.append(self._copy_shaped(v, f"mas_importance_{i}"))
        anchors.append(self._copy_shaped(v, f"mas_anchor_{i}"))
    self._mas = _MASState(targets, importances, anchors, strength, tasks,
                          proximal)

  @contextlib.contextmanager
  def _adding_state(self):
    """Lets variables be added after build, as Keras's LoRA does, under the
    model's distribution strategy."""
    tracker = self._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
      with _strategy_scope(self):
        yield
    finally:
      if was_locked:
        tracker.lock()

  def _copy_shaped(self, variable, name):
    """A zero, non-trainable float32 variable shaped and laid out like
    `variable`.

    Under `keras.distribution.ModelParallel` (JAX) the copy takes its
    variable's layout: Ω and θ* are sharded as the weight they belong to,
    and the penalty's element-wise terms stay on each weight's shards,
    instead of a replicated copy of every sharded weight on every device.
    """
    layout = getattr(variable, "_layout", None)
    if layout is None:
      return self.add_weight(shape=variable.shape, dtype="float32",
                             initializer="zeros", trainable=False, name=name)
    # `add_weight` takes no layout; this is its body with one.
    with keras_backend.name_scope(self.name, caller=self):
      copy = keras.Variable(initializer="zeros", shape=variable.shape,
                            dtype="float32", trainable=False, name=name,
                            layout=layout)
    self._track_variable(copy)
    return copy

  def _require_mas_state(self, action):
    if not self.built:
      raise ValueError(
          f"Invalid value for argument `model`. Cannot {action} an unbuilt "
          "model: call it on a batch of data or `model.build(input_shape)` "
          f"first. Received: unbuilt model '{self.name}'"
      )
    self._ensure_mas_state()
    current = [id(v) for v in self.trainable_variables]
    known = {id(v) for v in self._mas.targets}
    if any(i not in known for i in current):
      raise ValueError(
          f"Model '{self.name}' has trainable variables that did not exist "
          "when its MAS state was created. MASModel tracks the variables "
          "present when it is first built; create every layer (all task "
          "heads included) before the first `fit` or `consolidate`."
      )
    return self._mas

  @property
  def importances(self):
    """Ω: a list of variables, one per tracked trainable variable."""
    return list(self._require_mas_state("read the importance of").importances)

  @property
  def anchors(self):
    """θ*: a list of variables, one per tracked trainable variable."""
    return list(self._require_mas_state("read the anchors of").anchors)

  @property
  def mas_variables(self):
    """`[(θ, Ω, θ*)]`: each tracked trainable variable, its importance and
    its anchor, in the order of `importances` and `anchors`."""
    state = self._require_mas_state("read the variables of")
    return list(zip(state.targets, state.importances, state.anchors))

  @property
  def path_integral(self):
    """Synaptic Intelligence's `PathIntegral` (ω and the task's starting
    point) once `track_path_integral()` was called, else None."""
    return self._si_path

  @property
  def strength(self):
    """λ, the penalty strength, as a float."""
    return float(_value(self._require_mas_state("read the strength of").strength))

  @strength.setter
  def strength(self, value):
    value = regularizers.validate_strength(value)
    self._require_mas_state("set the strength of").strength.assign(value)

  @property
  def penalty_mode(self):
    """How the penalty acts in `fit`: `"gradient"` or `"proximal"`.

    `"gradient"` (default, the paper's): the penalty is part of the loss and
    its gradient `2λΩ(θ − θ*)` enters the optimizer step. It adds curvature
    `2λΩ`: beyond what the optimizer's step size can take (for SGD,
    `λ > (1 + momentum) / (learning_rate · max Ω)`) training diverges.

    `"proximal"`: the optimizer steps on the task loss alone, then each
    parameter moves to the exact minimiser of the quadratic around it,
    `θ ← (θ + cθ*) / (1 + c)` with `c = 2·η·λ·Ω` and `η` the learning rate:
    an implicit step, stable at any λ (as λ → ∞, θ → θ* where Ω > 0). The
    penalty is still reported in `loss` and `mas_penalty`.
    """
    mode = int(_value(
        self._require_mas_state("read the penalty mode of").proximal))
    return PENALTY_MODES[mode]

  @penalty_mode.setter
  def penalty_mode(self, value):
    if value not in PENALTY_MODES:
      raise ValueError(
          "Invalid value for argument `penalty_mode`. Expected one of "
          f"{list(PENALTY_MODES)}. Received: penalty_mode={value!r}")
    state = self._require_mas_state("set the penalty mode of")
    state.proximal.assign(PENALTY_MODES.index(value))
    self._proximal = value == "proximal"
    # The mode is fixed into the traced train step: trace again.
    self.train_function = None
    self.test_function = None

  @property
  def stop_on_divergence(self):
    """Whether `fit` stops when training diverges (default True).

    When True, `fit` adds a `keras_mas.core.callbacks.DivergenceGuard` unless its
    `callbacks` already hold one: at the end of an epoch whose loss or
    weights are NaN or infinite, the weights go back to their values at the
    start of that epoch and `keras_mas.core.callbacks.TrainingDivergedError` is
    raised, naming λ and the stable limit. False trains on regardless.
    A setting of this Python object: saving does not keep it.
    """
    return self._stop_on_divergence

  @stop_on_divergence.setter
  def stop_on_divergence(self, value):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(
          "Invalid value for argument `stop_on_divergence`. Expected True or "
          f"False. Received: stop_on_divergence={value!r}")
    self._stop_on_divergence = bool(value)

  @property
  def penalty_log_interval(self):
    """Every how many training steps `fit` computes the penalty's value.

    The update needs only the penalty's gradient `2λΩ(θ − θ*)`; its value
    `λ Σ Ω (θ − θ*)²` is for the logs (`mas_penalty`, and `loss`, the task
    loss plus the penalty), and costs two more passes over the parameters
    per step. With an interval k > 1 the value is computed on every k-th
    step (and the first of each epoch): `mas_penalty` is the mean over
    those steps, and the other steps' `loss` adds that running mean. The
    training itself is the same for every k. Default 1: exact logs.
    `evaluate` and `mas_penalty()` are always exact. A setting of this
    Python object: saving does not keep it.
    """
    return self._penalty_log_interval

  @penalty_log_interval.setter
  def penalty_log_interval(self, value):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(
          "Invalid value for argument `penalty_log_interval`. Expected an "
          f"integer >= 1. Received: penalty_log_interval={value!r}")
    self._penalty_log_interval = int(value)
    self.train_function = None  # Fixed into the traced train step.

  def fit(self, *args, **kwargs):
    """`keras.Model.fit`, stopping with an error if training diverges.

    See `stop_on_divergence`; everything else is Keras's `fit`.

    Raises:
      keras_mas.core.callbacks.TrainingDivergedError: if the loss or the weights
        become NaN or infinite (the weights are restored first).
    """
    # `callbacks` is Keras's sixth positional argument.
    if len(args) > 5:
      args = args[:5] + (self._guarded(args[5]),) + args[6:]
    else:
      kwargs["callbacks"] = self._guarded(kwargs.get("callbacks"))
    if self.preprocessor is not None:
      args, kwargs = self._preprocessed_fit_arguments(args, kwargs)
    return super().fit(*args, **kwargs)

  @property
  def preprocessor(self):
    """The preprocessor `fit`, `evaluate`, `predict` and `consolidate` apply
    to raw inputs: a wrapped KerasHub task's own; None for other models."""
    return None

  def _preprocessed_fit_arguments(self, args, kwargs):
    """`fit`'s arguments with the data as preprocessed batches."""
    names = ("x", "y", "batch_size", "epochs", "verbose", "callbacks",
             "validation_split", "validation_data", "shuffle")
    kwargs = {**dict(zip(names, args)), **kwargs}
    if kwargs.get("validation_split"):
      raise ValueError(
          "Invalid value for argument `validation_split`. Expected 0 for a "
          "model with a preprocessor: pass `validation_data` instead. "
          f"Received: validation_split={kwargs['validation_split']!r}")
    x = kwargs.pop("x", None)
    shuffle = kwargs.pop("shuffle", True)
    kwargs["x"] = preprocessing.preprocessed(
        self.preprocessor, x, kwargs.pop("y", None),
        kwargs.pop("sample_weight", None), kwargs.pop("batch_size", None),
        shuffle=shuffle and not isinstance(x, tf.data.Dataset))
    # The batches are shuffled above when they come from arrays; Keras
    # cannot shuffle a pipeline (and warns when asked to).
    kwargs["shuffle"] = False
    validation = kwargs.get("validation_data")
    if validation is not None:
      if isinstance(validation, tf.data.Dataset):
        kwargs["validation_data"] = preprocessing.preprocessed(
            self.preprocessor, validation)
      else:
        vx, vy, vw = keras.utils.unpack_x_y_sample_weight(validation)
        kwargs["validation_data"] = preprocessing.preprocessed(
            self.preprocessor, vx, vy, vw,
            kwargs.get("validation_batch_size"))
    return (), kwargs

  def evaluate(self, x=None, y=None, batch_size=None, verbose="auto",
               sample_weight=None, **kwargs):
    """`keras.Model.evaluate`; raw inputs go through `preprocessor`."""
    if self.preprocessor is not None:
      x = preprocessing.preprocessed(self.preprocessor, x, y, sample_weight,
                                     batch_size)
      y = batch_size = sample_weight = None
    return super().evaluate(x, y, batch_size=batch_size, verbose=verbose,
                            sample_weight=sample_weight, **kwargs)

  def predict(self, x, batch_size=None, verbose="auto", **kwargs):
    """`keras.Model.predict`; raw inputs go through `preprocessor`."""
    if self.preprocessor is not None:
      x = preprocessing.preprocessed(self.preprocessor, x,
                                     batch_size=batch_size, inputs_only=True)
      batch_size = None
    return super().predict(x, batch_size=batch_size, verbose=verbose,
                           **kwargs)

  def _guarded(self, callbacks):
    if not self._stop_on_divergence:
      return callbacks
    listed = (callbacks.callbacks
              if isinstance(callbacks, keras.callbacks.CallbackList)
              else list(callbacks or []))
    if any(isinstance(c, callbacks_lib.DivergenceGuard) for c in listed):
      return callbacks
    guard = callbacks_lib.DivergenceGuard()
    if isinstance(callbacks, keras.callbacks.CallbackList):
      guard.set_model(self)
      callbacks.callbacks.insert(0, guard)
      return callbacks
    # First, so that it restores the weights before a checkpoint callback
    # at the same epoch end can save diverged ones.
    return [guard] + listed

  def reset_optimizer(self):
    """Gives the optimizer a fresh state for a new task, without a retrace.

    Every optimizer variable (step count, moments, accumulators) goes back
    to the value a newly built optimizer of the same configuration gives
    it; the configuration (learning rate included) stays. `compile` with a
    new optimizer does the same but discards the traced train, test and
    predict functions: the next call of each traces again (seconds on a
    large model). Between tasks whose loss and metrics are the same, call
    this instead:

    ```python
    model.fit(task_a_x, task_a_y, epochs=5)
    model.consolidate(task_a_x)
    model.reset_optimizer()  # No momentum from task A moves the weights.
    model.fit(task_b_x, task_b_y, epochs=5)  # No retrace.
    ```

    Raises:
      ValueError: if the model is not compiled, or the trainable variables
        changed since the optimizer was built (compile again instead).
    """
    optimizer = getattr(self, "optimizer", None)
    if optimizer is None:
      raise ValueError(
          "Invalid call to `reset_optimizer`. Expected a compiled model. "
          f"Received: model {self.name!r}, not compiled")
    if not optimizer.built:
      return  # Built fresh at the next `fit`.
    variables = self.trainable_variables
    built_for = getattr(optimizer, "_trainable_variables", variables)
    with _strategy_scope(self):
      fresh = keras.optimizers.deserialize(
          keras.optimizers.serialize(optimizer))
      fresh.build(variables)
    old, new = optimizer.variables, fresh.variables
    if ([id(v) for v in built_for] != [id(v) for v in variables]
        or len(old) != len(new) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(old, new))):
      raise ValueError(
          "Invalid call to `reset_optimizer`. Expected the trainable "
          "variables the optimizer was built for. Received: model "
          f"{self.name!r} whose trainable variables changed since; compile "
          "it again instead")
    for a, b in zip(old, new):
      a.assign(b.value)

  @property
  def rehearsal(self):
    """A buffer rehearsed with every training batch, or None (default).

    An object with two methods that run inside the traced train step:
    `join(x, y, sample_weight)` returns the batch to train on, the incoming
    batch with the buffer's samples, as `(x, y, sample_weight)`, the
    incoming samples first; `update(x, y, y_pred, incoming)` then updates the
    buffer from the joined batch and its predictions (before the step),
    `incoming` the number of incoming samples. Metrics are computed on the
    incoming samples alone, from predictions made before the step: on a
    stream they are test-then-train (prequential); those predictions are
    the training forward pass's (`training=True`: with dropout, the
    prequential accuracy is that of the model with dropout on). Task-free
    learning (`keras_mas.task_free`) sets it. Setting it retraces the train
    step; saving does not keep it. Not supported under a distribution
    strategy, nor on JAX: the methods are written in TensorFlow ops, traced
    into TensorFlow's step and run eagerly in PyTorch's (on copies of the
    batch), while JAX compiles its step whole.
    """
    return self._rehearsal

  @rehearsal.setter
  def rehearsal(self, buffer):
    if buffer is not None and not all(
        callable(getattr(buffer, name, None)) for name in ("join", "update")):
      raise ValueError(
          "Invalid value for argument `rehearsal`. Expected None or an "
          "object with `join` and `update` methods. Received: "
          f"rehearsal={buffer!r}")
    if buffer is not None and _JAX:
      raise ValueError(
          "Invalid value for argument `rehearsal`. Expected None on the JAX "
          "backend: rehearsal buffers run inside TensorFlow's and PyTorch's "
          f"train steps only. Received: rehearsal={buffer!r}")
    if buffer is not None and _replicas(self) > 1:
      raise ValueError(
          "Invalid value for argument `rehearsal`. Expected no distribution "
          "strategy (each replica would keep its own buffer). Received: "
          f"{type(self.distribute_strategy).__name__} with "
          f"{self.distribute_strategy.num_replicas_in_sync} replicas")
    object.__setattr__(self, "_rehearsal", buffer)
    self.train_function = None

  def track_path_integral(self):
    """Accumulates Synaptic Intelligence's path integral during `fit`.

    Adds two non-trainable copies of the parameters: `ω = Σ −g·Δθ` over
    training steps (g the task-loss gradient, Δθ the step actually taken)
    and the parameters where the current task started. Both restart at each
    `consolidate`. Then `consolidate(method="path_integral")` gives SI's
    importance. Idempotent.

    Raises:
      ValueError: if the model is unbuilt or trained on several replicas.
    """
    state = self._require_mas_state("track the path integral of")
    if self._si_path is not None:
      return
    if _replicas(self) > 1:
      raise ValueError(
          "Invalid value for argument `model`. The path integral is tracked "
          "on one replica only. Received: a model under a strategy with "
          f"{self.distribute_strategy.num_replicas_in_sync} replicas")
    with self._adding_state():
      self._si_path = path_integral_lib.PathIntegral.create(
          state.targets, self._copy_shaped)
    self.train_function = None

  @property
  def consolidated_tasks(self):
    """How many times `consolidate` has run on this model."""
    return int(_value(self._require_mas_state("count the tasks of").tasks))

  # ------------------------------------------------------------------------
  # The method.

  def consolidate(self, data, method="mas", strength=None, accumulate="sum",
                  alpha=0.5, num_samples=None, batch_size=None,
                  normalize=None, **options):
    """Measures importance on `data` and anchors the current weights.

    Runs after a task is learned: `Ω_new` is computed with `method`, then
    `Ω ← Ω + Ω_new` (`accumulate="sum"`, the paper's choice) or
    `Ω ← α·Ω + (1−α)·Ω_new` (`"decay"`, as Avalanche and FACIL do; the first
    consolidation takes `Ω_new` as it is), and `θ* ← θ`. Nothing changes if
    an argument is invalid or the importance is not finite.

    Args:
      data: inputs to measure importance on; labels, if any, are ignored.
        A batched `tf.data.Dataset` or an array (see `importance.mas`); for
        a model with a `preprocessor`, the raw inputs it takes (strings,
        images), preprocessed here.
      method: `"mas"` (global, default) or `"local_mas"` (Hebbian).
      strength: λ for the following tasks; `None` keeps the current value,
        which is 1.0 until set (here or with `model.strength`).
      accumulate: `"sum"` or `"decay"`.
      alpha: weight of the old importance for `accumulate="decay"`, in [0, 1].
      num_samples: use at most this many samples.
      batch_size: batch size when `data` is an array; by default
        `importance.default_batch_size(data, model)` (32 to 1,024
        samples, fewer where the outputs are large, as an LM's logits).
      normalize: None (the paper: Ω as measured), `"mean"` (`Ω_new`
        divided by its mean over every protected weight, so that Ω's
        scale, which follows the model's outputs — an LM's sum over tokens
        and vocabulary — leaves λ; relative importances are kept) or
        `"max"` (divided by its largest entry).
      **options: passed to the estimator, e.g. `per_sample=False` or
        `output_fn` for `"mas"`.

    Returns:
      The new importance `Ω_new`, a list of tensors.

    Raises:
      ValueError: if an argument is invalid, the model is not built, its
        weights are not finite, or the importance contains NaN or infinity.
    """
    if method not in ESTIMATORS:
      raise ValueError(
          "Invalid value for argument `method`. Expected one of "
          f"{sorted(ESTIMATORS)}. Received: method={method!r}"
      )
    if accumulate not in _ACCUMULATE:
      raise ValueError(
          "Invalid value for argument `accumulate`. Expected one of "
          f"{list(_ACCUMULATE)}. Received: accumulate={accumulate!r}"
      )
    try:
      alpha_value = float(alpha)
    except (TypeError, ValueError):
      alpha_value = float("nan")
    if not 0.0 <= alpha_value <= 1.0:
      raise ValueError(
          "Invalid value for argument `alpha`. Expected a number in [0, 1]. "
          f"Received: alpha={alpha!r}"
      )
    if normalize not in NORMALIZATIONS:
      raise ValueError(
          "Invalid value for argument `normalize`. Expected one of "
          f"{list(NORMALIZATIONS)}. Received: normalize={normalize!r}")
    if strength is not None:
      strength = regularizers.validate_strength(strength)
    state = self._require_mas_state("consolidate")
    diverged = [v.path for v in state.targets if not _all_finite(v)]
    if diverged:
      raise ValueError(
          f"Cannot consolidate model '{self.name}': its weights {diverged} "
          "are not finite (NaN or infinite), so training diverged before "
          "this call; importance measured there would be meaningless. "
          "Restore good weights (a `fit` that stops on divergence does), "
          "then consolidate. The existing importance and anchors were kept.")

    if self.preprocessor is not None:
      data = preprocessing.preprocessed(self.preprocessor, data,
                                        batch_size=batch_size)
      batch_size = None
    measured = ESTIMATORS[method](
        self, data, num_samples=num_samples, batch_size=batch_size, **options)
    by_id = dict(zip((id(v) for v in self.trainable_variables), measured))
    new = [by_id.get(id(v), _zeros(v.shape)) for v in state.targets]
    bad = [v.path for v, omega in zip(state.targets, new)
           if not _all_finite(omega)]
    if bad:
      raise ValueError(
          f"The importance measured with method={method!r} is not finite for "
          f"{bad}: the model's outputs or gradients overflow on this data. "
          "The existing importance and anchors were kept."
      )

    if normalize is not None:
      new = _normalized(new, normalize)
    first = int(_value(state.tasks)) == 0
    for omega, anchor, v, omega_new in zip(
        state.importances, state.anchors, state.targets, new):
      if accumulate == "sum" or first:
        omega.assign(omega + omega_new if accumulate == "sum" else omega_new)
      else:
        omega.assign(alpha_value * omega + (1.0 - alpha_value) * omega_new)
      anchor.assign(_float32(v))
    state.tasks.assign_add(1)
    if strength is not None:
      state.strength.assign(strength)
    if self._si_path is not None:
      self._si_path.restart()
    return new

  def mas_penalty(self):
    """`λ Σ Ω (θ − θ*)²` over all tracked variables, a float32 scalar."""
    state = self._require_mas_state("compute the penalty of")
    terms = [reg(v) for v, reg in zip(state.targets, state.regularizers)]
    if not _TF:
      return penalty_lib.total(terms)
    return tf.add_n(terms) if terms else tf.zeros((), "float32")

  # ------------------------------------------------------------------------
  # Keras integration.

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                   training=True):
    """Task loss plus the MAS penalty, as `evaluate` and users see it."""
    loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
    if self._mas is None:
      # Keras's symbolic build of a subclassed model, before its state
      # exists (`make_train_function` creates it before tracing).
      return loss
    penalty = self.mas_penalty()
    self.task_loss_tracker.update_state(loss)
    self.penalty_tracker.update_state(penalty)
    # Like a regularization loss: summed, and scaled per replica under
    # tf.distribute.
    cast = tf.cast if _TF else keras.ops.cast
    return loss + cast(self._aggregate_additional_loss(penalty), loss.dtype)

  def train_step(self, *args):
    """One step on `task loss + λ Σ Ω (θ − θ*)²` (see `keras_mas.core.trainer`).

    The task loss is differentiated by the tape; the penalty's gradient
    `2λΩ(θ − θ*)` is added in closed form (`keras_mas.core.penalty`), or in
    proximal mode applied as a proximal step after the optimizer's update;
    Synaptic Intelligence's path integral, when tracked, reads each update.

    On JAX, Keras calls it as `train_step(state, data)` and it returns
    `(logs, state)`: the same step and terms, run on the state's values
    (`keras_mas.core._jax_trainer`). On PyTorch the step runs eagerly, its
    gradients from autograd.
    """
    if _JAX:
      state, data = args
      return _jax_trainer.train_step(self, state, data, self._task_loss,
                                     self._gradient_terms)
    data, = args
    return self._replica_logs(trainer.train_step(
        self, data, self._task_loss, self._gradient_terms))

  def _task_loss(self, x, y, y_pred, sample_weight):
    # Keras's loss alone: `compute_loss` would add the penalty, whose
    # gradient the penalty term adds in closed form.
    return super().compute_loss(x, y, y_pred, sample_weight, training=True)

  def _gradient_terms(self):
    # A subclassed model that `fit` builds is built by the forward pass,
    # inside the trace; its MAS state is then created here, once.
    self._ensure_mas_state()
    terms = [penalty_lib.PenaltyTerm(self._mas, self._proximal,
                                     self._penalty_log_interval,
                                     self.penalty_tracker)]
    if self._si_path is not None:
      terms.append(self._si_path)
    return terms

  def test_step(self, *args):
    if not _TF:
      # Keras's step (on JAX `test_step(state, data)`); the penalty is in
      # `compute_loss`. No replicas to reshape logs for.
      return super().test_step(*args)
    return self._replica_logs(super().test_step(*args))

  def _replica_logs(self, logs):
    if not _TF:
      return logs
    return multi_worker.replica_logs(self._distribute_strategy, logs)

  def make_train_function(self, force=False):
    # Subclassed models may first be built inside `fit`: create Ω and θ*
    # before the train step is traced, so they are part of the graph.
    self._ensure_mas_state()
    return super().make_train_function(force=force)

  def _symbolic_build(self, iterator=None, data_batch=None):
    # Keras's JAX and PyTorch `fit` call this with the epoch iterator after
    # every `compile` (the compiled loss and metrics are unbuilt), and Keras
    # then builds from a batch it draws: that starts an iteration of the
    # dataset, so a dataset reshuffled each iteration
    # (`pipelines.array_batches`) trains on its second order, not its first,
    # unlike a `fit` after `reset_optimizer` (nothing to build) and unlike
    # TensorFlow (built when the step is traced). Shapes and dtypes are all
    # the build reads.
    if (data_batch is None and isinstance(
        getattr(iterator, "data_adapter", None),
        tf_dataset_adapter.TFDatasetAdapter)):
      data_batch = multi_worker.element_spec(iterator)
    super()._symbolic_build(iterator=iterator, data_batch=data_batch)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras's JAX trainer has no strategy (nor calls this hook).
    strategy = getattr(self, "_distribute_strategy", None)
    spec = (multi_worker.element_spec(iterator)
            if strategy is not None and data_batch is None else None)
    if spec is not None:
      # Keras builds under a strategy from a batch it draws, which starts an
      # iteration: a reshuffling dataset would then train on other orders
      # than on one device. Shapes and dtypes are all the build reads.
      with strategy.scope():
        self._symbolic_build(data_batch=spec)
    elif iterator is not None and multi_worker.is_multi_worker(strategy):
      # See `keras_mas.core.multi_worker` (keras-team/keras#20585).
      multi_worker.symbolic_build(self, strategy, iterator)
    else:
      super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  def make_test_function(self, force=False):
    self._ensure_mas_state()
    return super().make_test_function(force=force)

  def save(self, filepath, overwrite=True, zipped=None, **kwargs):
    """Saves the model as Keras does, Ω, θ*, λ and the task count included.

    Before any file is opened, refuses a model with a `MASRegularizer` set
    on a variable alone, which Keras would not save (see
    `keras_mas.regularizers.attach`).

    Loading needs the classes registered: `import keras_mas` before
    `keras.models.load_model` (Keras imports only its own packages when it
    meets an unknown class). A subclass of `MASModel` saves like any
    subclassed Keras model: decorate it with
    `@keras.saving.register_keras_serializable()` and give it a
    `get_config` returning its constructor arguments.
    """
    regularizers.check_saveable(self)
    return super().save(filepath, overwrite=overwrite, zipped=zipped,
                        **kwargs)

  def save_weights(self, filepath, overwrite=True, **kwargs):
    regularizers.check_saveable(self)  # Before any file is opened.
    return super().save_weights(filepath, overwrite=overwrite, **kwargs)

  def save_own_variables(self, store):
    # Also reached through `keras.saving.save_model` and `save_weights`.
    regularizers.check_saveable(self)
    self._ensure_mas_state()
    super().save_own_variables(store)

  def load_own_variables(self, store):
    self._ensure_mas_state()
    super().load_own_variables(store)
    self._proximal = bool(int(_value(self._mas.proximal)))


@keras.saving.register_keras_serializable(package="keras_mas")
class FunctionalMASModel(MASModel, Functional):
  """The class of `MASModel(inputs, outputs)`: a functional MASModel."""

  def __init__(self, inputs, outputs, name=None, **kwargs):
    Functional.__init__(self, inputs, outputs, name=name, **kwargs)
    self._init_mas()

  def get_config(self):
    return _with_path_flag(self, super().get_config())

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    track = config.pop("track_path_integral", False)
    model = super().from_config(config, custom_objects=custom_objects)
    if track:
      model.track_path_integral()  # Its variables exist before loading.
    return model


def _backbone_lora(model):
  """`{"rank", "layers"}` of a KerasHub task's LoRA-enabled backbone, or None."""
  backbone = getattr(model, "backbone", None)
  if backbone is None or not hasattr(backbone, "enable_lora"):
    return None
  enabled = [layer for layer in backbone._flatten_layers(include_self=False)  # pylint: disable=protected-access
             if getattr(layer, "lora_enabled", False)]
  if not enabled:
    return None
  return {"rank": int(enabled[0].lora_rank),
          "layers": sorted({layer.name for layer in enabled})}


def _with_path_flag(model, config):
  if model._si_path is not None:
    config["track_path_integral"] = True
  return config


def _value(variable):
  """A variable's value as NumPy, distributed (mirrored) variables included."""
  if not _TF:
    return keras.ops.convert_to_numpy(variable.value)
  return keras.ops.convert_to_numpy(tf.convert_to_tensor(variable.value))


def _all_finite(value):
  """Whether a variable or tensor holds no NaN or infinity. On JAX the test
  runs where the shards are: across processes no one process can fetch a
  sharded value, but each can its replicated verdict."""
  if _TF:
    if isinstance(value, keras.Variable):
      value = _value(value)
    return bool(np.all(np.isfinite(keras.ops.convert_to_numpy(value))))
  if isinstance(value, keras.Variable):
    value = value.value
  return bool(keras.ops.convert_to_numpy(
      keras.ops.all(keras.ops.isfinite(value))))


def _zeros(shape):
  return tf.zeros(shape) if _TF else keras.ops.zeros(shape)


def _float32(variable):
  """A variable's value cast to float32, as a tensor of the backend."""
  if not _TF:
    # A copy: JAX variables assigned the same array would share a buffer,
    # which the compiled train step, donating its state, refuses.
    return keras.ops.copy(keras.ops.cast(variable.value, "float32"))
  return tf.cast(variable, "float32")


def _strategy_scope(model):
  """The model's `tf.distribute` scope; no scope on other backends, whose
  trainers have no strategy (JAX distributes with `keras.distribution`)."""
  if not _TF:
    return contextlib.nullcontext()
  return model.distribute_strategy.scope()


def _replicas(model):
  """The number of replicas the model trains on in sync (1 off TensorFlow)."""
  if not _TF:
    return 1
  return model.distribute_strategy.num_replicas_in_sync


def _functional_init_arguments(args, kwargs):
  return (len(args) == 2
          or (len(args) == 1 and "outputs" in kwargs)
          or ("inputs" in kwargs and "outputs" in kwargs))


def _is_plain_graph(model):
  """Whether `model` is a Sequential or functional model whose graph alone
  (Keras's own config) rebuilds it.

  A subclass with a config of its own (a KerasHub `CausalLM`, say) is not:
  rebuilt from its graph, a layer it reuses from inside another one (the
  backbone's token embedding as the output projection) would come back as a
  second, separate layer with variables of its own.
  """
  if isinstance(model, keras.Sequential):
    return type(model).get_config is keras.Sequential.get_config
  return (hasattr(model, "_operations")
          and hasattr(model, "_run_through_graph")
          and type(model).get_config is Functional.get_config
          and type(model).from_config.__func__ is Functional.from_config.__func__)


def _normalized(importances, statistic):
  """`importances` divided by their `statistic` (`"mean"`, `"max"`) over
  every entry; unchanged where that is 0 (nothing measured)."""
  if multi_process.count() > 1:
    # The statistic where the shards are. Decided by the run, not by each
    # array: every process must run the same computations, and whether an
    # entry is laid out over other processes' devices may differ from one
    # entry to the next (a variable without measured importance is local).
    ops = keras.ops
    if statistic == "mean":
      count = sum(int(np.prod(o.shape)) for o in importances)
      scale = sum(ops.sum(o) for o in importances) / max(count, 1)
    else:
      scale = ops.max(ops.stack([ops.max(o) for o in importances]))
    if not float(ops.convert_to_numpy(scale)) > 0:
      return importances
    return [o / scale for o in importances]
  values = [keras.ops.convert_to_numpy(o).astype("float64")
            for o in importances]
  count = sum(v.size for v in values)
  if statistic == "mean":
    scale = sum(float(v.sum()) for v in values) / max(count, 1)
  else:
    scale = max((float(v.max()) for v in values if v.size), default=0.0)
  if not scale > 0:
    return importances
  return [keras.ops.convert_to_tensor((v / scale).astype("float32"))
          for v in values]


@keras.saving.register_keras_serializable(package="keras_mas")
class WrappedMASModel(MASModel):
  """A MASModel around an existing subclassed model (see `from_model`)."""

  def __init__(self, model, **kwargs):
    super().__init__(**kwargs)
    self.model = model
    if model.built:
      self.built = True
      self._ensure_mas_state()

  def build(self, input_shape):
    if not self.model.built:
      self.model.build(input_shape)

  def call(self, inputs, training=None):
    return self.model(inputs, training=training)

  @property
  def preprocessor(self):
    return getattr(self.model, "preprocessor", None)

  def get_config(self):
    config = super().get_config()
    config["model"] = keras.saving.serialize_keras_object(self.model)
    lora = _backbone_lora(self.model)
    if lora is not None:
      config["backbone_lora"] = lora
    return _with_path_flag(self, config)

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    track = config.pop("track_path_integral", False)
    lora = config.pop("backbone_lora", None)
    inner = keras.saving.deserialize_keras_object(config.pop("model"))
    if lora is not None:
      # A KerasHub backbone's config does not keep its LoRA: enable it again
      # before the MAS state is made for what trains, and weights load.
      inner.backbone.enable_lora(lora["rank"],
                                 target_layer_names=lora["layers"])
    model = cls(inner, **config)
    if track:
      model.track_path_integral()
    return model
