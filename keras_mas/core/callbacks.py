"""TensorBoard logging for task sequences: drift, importance, accuracy matrix.

Keras's own `keras.callbacks.TensorBoard` logs the training curves (`loss`,
`task_loss`, `mas_penalty`, `accuracy`); these add what is particular to
continual learning. Steps keep increasing across tasks: epochs count from
the start of the sequence, task-level summaries use the task index.
"""

import io

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "DivergenceGuard", "DriftLogger", "TrainingDivergedError",
    "log_accuracy_matrix", "log_importance",
]


def _layer_name(variable):
  return variable.path.rsplit("/", 1)[0] if "/" in variable.path else (
      variable.name)


class DriftLogger(keras.callbacks.Callback):
  """Logs `‖θ − θ*‖₂` per layer after every epoch under `drift/<layer>`.

  Args:
    writer: a `tf.summary` writer.
  """

  def __init__(self, writer):
    super().__init__()
    self.writer = writer

  def on_epoch_end(self, epoch, logs=None):
    per_layer = {}
    for v, _, anchor in self.model.mas_variables:
      per_layer.setdefault(_layer_name(v), []).append(
          _squared_distance(v, anchor))
    with self.writer.as_default():
      for layer, squares in per_layer.items():
        tf.summary.scalar(f"drift/{layer}", tf.sqrt(tf.add_n(squares)),
                          step=epoch)


def _squared_distance(variable, anchor):
  """`Σ (v − θ*)²` as a float32 scalar of TensorFlow.

  On JAX the sum runs where the shards are: across processes no process
  can fetch a weight sharded over another's devices, but each can the
  replicated sum (every process runs it, as every one runs the callback).
  """
  if keras.backend.backend() == "tensorflow":
    return tf.reduce_sum(tf.square(tf.cast(variable, "float32") - anchor))
  ops = keras.ops
  diff = ops.cast(variable.value, "float32") - anchor.value
  return tf.constant(ops.convert_to_numpy(ops.sum(ops.square(diff))))


def log_importance(writer, model, step):
  """Histograms of Ω per variable, under `importance/<variable path>`."""
  with writer.as_default():
    for v, omega, _ in model.mas_variables:
      tf.summary.histogram(f"importance/{v.path}", omega, step=step)


def log_accuracy_matrix(writer, matrix, metrics, step, image=True):
  """Per-task accuracy, ACC, forgetting and the matrix as an image.

  Args:
    writer: a `tf.summary` writer.
    matrix: `T×T` accuracies, rows after `step` filled, the rest NaN.
    metrics: dict with `acc` and `forgetting` of the tasks so far.
    step: index of the task just trained.
    image: also draw the matrix as an image (a matplotlib figure, a few
      tenths of a second: `run_sequence` draws it after the last task).
  """
  matrix = np.asarray(matrix, dtype="float64")
  with writer.as_default():
    for j, accuracy in enumerate(matrix[step]):
      tf.summary.scalar(f"accuracy/task_{j}", accuracy, step=step)
    tf.summary.scalar("sequence/acc", metrics["acc"], step=step)
    tf.summary.scalar("sequence/forgetting", metrics["forgetting"], step=step)
    if image:
      tf.summary.image("accuracy_matrix", _matrix_image(matrix)[None],
                       step=step)


def _matrix_image(matrix):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  size = len(matrix)
  figure, axes = plt.subplots(figsize=(1.0 + 0.7 * size, 0.8 + 0.7 * size))
  axes.imshow(np.nan_to_num(matrix, nan=0.0), vmin=0.0, vmax=1.0,
              cmap="viridis")
  for i in range(size):
    for j in range(size):
      if not np.isnan(matrix[i, j]):
        axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                  color="white" if matrix[i, j] < 0.6 else "black", fontsize=8)
  axes.set_xlabel("evaluated on task j")
  axes.set_ylabel("after training task i")
  axes.set_xticks(range(size))
  axes.set_yticks(range(size))
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=80)
  plt.close(figure)
  return tf.image.decode_png(buffer.getvalue(), channels=4)


class TrainingDivergedError(RuntimeError):
  """Training stopped: the loss or the weights were no longer finite."""


class DivergenceGuard(keras.callbacks.Callback):
  """Stops a diverging task, restores the last good weights and says why.

  At the end of each epoch, if the loss or any trainable weight is NaN or
  infinite, the weights are restored to their values at the start of that
  epoch and `TrainingDivergedError` is raised, naming the MAS strength λ
  and, for SGD, the largest λ at which the penalty is stable:
  `(1 + momentum) / (learning_rate · max Ω)`.

  `MASModel.fit` adds one unless its `callbacks` hold one already or
  `model.stop_on_divergence` is False; pass one yourself to a plain
  `keras.Model.fit`:

  ```python
  model.fit(x, y, callbacks=[keras_mas.core.callbacks.DivergenceGuard()])
  ```
  """

  def on_epoch_begin(self, epoch, logs=None):
    if keras.backend.backend() == "jax":
      # JAX's arrays never change: keeping them is the snapshot, with no
      # copy to the host (which a value sharded across processes refuses).
      self._good = [v.value for v in self.model.trainable_variables]
    else:
      self._good = [v.numpy() for v in self.model.trainable_variables]

  def on_epoch_end(self, epoch, logs=None):
    loss = (logs or {}).get("loss")
    finite = loss is None or np.isfinite(loss)
    # One reduction per variable on the backend's device, no copy to the
    # host.
    finite = finite and all(
        bool(keras.ops.all(keras.ops.isfinite(v)))
        for v in self.model.trainable_variables)
    if finite:
      return
    for v, good in zip(self.model.trainable_variables, self._good):
      v.assign(good)
    self.model.stop_training = True
    raise TrainingDivergedError(_divergence_message(self.model, epoch))


def _divergence_message(model, epoch):
  message = (f"Training diverged in epoch {epoch}: the loss or the weights "
             "became NaN or infinite. The weights were restored to their "
             "values at the start of that epoch.")
  if not hasattr(type(model), "mas_variables"):  # Not a MASModel.
    return message
  message += f" MAS strength λ={model.strength:g}."
  optimizer = model.optimizer
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)
  max_omega = max(float(tf.reduce_max(o)) for o in model.importances)
  if isinstance(optimizer, keras.optimizers.SGD) and max_omega > 0:
    rate = float(optimizer.learning_rate)
    limit = (1.0 + float(optimizer.momentum)) / (rate * max_omega)
    message += (f" With SGD (learning rate {rate:g}, momentum "
                f"{float(optimizer.momentum):g}) and max Ω={max_omega:g}, the "
                f"penalty is stable for λ < {limit:g}.")
  message += (" Lower the strength, or set penalty_mode='proximal', which is "
              "stable at any λ.")
  return message
