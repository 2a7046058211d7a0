"""Synaptic Intelligence's path integral, accumulated during `MASModel.fit`.

Zenke, Poole and Ganguli, "Continual Learning Through Synaptic
Intelligence", ICML 2017: `ω = Σ_steps −g · Δθ`, with `g` the task-loss
gradient (the penalty's excluded) and `Δθ` the step the optimizer took.
`importance.path_integral` turns ω into SI's importance. Once
`MASModel.track_path_integral()` was called, `PathIntegral` is a term of the
train step (`keras_mas.core.trainer`) around the optimizer's update. The
variables are weights of the model, so saving keeps them. Written in
`keras.ops`, for TensorFlow's traced step, PyTorch's eager one and JAX's
stateless one (where the variables read and assigned are the trainer
state's values, through a `keras.StatelessScope`).
"""

from keras import ops
import tensorflow as tf

from keras_mas import _backend

__all__ = ["PathIntegral"]


class PathIntegral:
  """ω and the task's starting point, one pair per tracked variable.

  A plain object, so Keras does not track its variables a second time; they
  are weights of the model that made them.

  Attributes:
    targets: the tracked trainable variables.
    integrals: ω, float32 variables shaped like the targets.
    starts: the targets' values when the task started.
  """

  def __init__(self, targets, integrals, starts):
    self.targets = targets
    self.integrals = integrals
    self.starts = starts
    self._token = None  # Between a step's two halves, while tracing.

  @classmethod
  def create(cls, targets, make_variable):
    """Makes ω = 0 and start = θ for `targets`.

    Args:
      targets: the trainable variables to track.
      make_variable: `(variable, name) -> ` a zero, non-trainable float32
        weight of the model shaped like `variable`.

    Returns:
      A `PathIntegral`.
    """
    integrals, starts = [], []
    for i, v in enumerate(targets):
      integrals.append(make_variable(v, f"si_path_integral_{i}"))
      starts.append(make_variable(v, f"si_start_{i}"))
    path = cls(targets, integrals, starts)
    path.restart()
    return path

  def restart(self):
    """A new task: ω ← 0, start ← θ."""
    for w, start, v in zip(self.integrals, self.starts, self.targets):
      if _backend.TENSORFLOW:
        w.assign(tf.zeros_like(w))
        start.assign(tf.cast(v, "float32"))
      else:
        # A copy of θ: on JAX a shared buffer would be donated twice by the
        # compiled train step.
        w.assign(ops.zeros(w.shape, "float32"))
        start.assign(ops.copy(ops.cast(v.value, "float32")))

  def before_update(self, step):
    """A term of the train step: reads what the update needs."""
    self._token = self.before_step(step.variables, step.task_gradients,
                                   step.loss_scale)

  def after_update(self, step):
    """A term of the train step: accumulates ω for the update just made."""
    del step
    self.after_step(self._token)
    self._token = None

  def before_step(self, variables, task_gradients, loss_scale):
    """What the update needs, read before the optimizer step.

    Args:
      variables: the variables `task_gradients` belong to, in order.
      task_gradients: gradients of the (scaled) task loss alone.
      loss_scale: the optimizer's loss scale (1 without mixed precision).

    Returns:
      An opaque value for `after_step`.
    """
    unscale = 1.0 / ops.cast(loss_scale, "float32")
    by_id = dict(zip((id(v) for v in variables), task_gradients))
    gradients = [
        None if by_id.get(id(v)) is None
        else ops.cast(by_id[id(v)], "float32") * unscale
        for v in self.targets]
    # A copy: PyTorch's update writes into the variable's own tensor.
    before = [ops.copy(ops.cast(v, "float32")) for v in self.targets]
    return gradients, before

  def after_step(self, token):
    """`ω += −g · Δθ` for the step just taken."""
    gradients, before = token
    for w, g, v, b in zip(self.integrals, gradients, self.targets, before):
      if g is not None:
        w.assign_add(-g * (ops.cast(v, "float32") - b))
