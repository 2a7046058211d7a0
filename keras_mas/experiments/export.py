"""SavedModel export of the serving model, loadable without keras_mas."""

import os
import shutil

import keras
import tensorflow as tf

__all__ = ["ServingExport", "export_serving"]


class ServingExport:
  """Writes a model's SavedModel again and again, tracing it once.

  A run exports after every task; the endpoints stay the same while the
  heads do (domain-incremental runs: always), so the traced archive is kept
  and only the current weights are written, which costs less than tracing
  a fresh archive (benchmarks/CHOICES.md).

  Example:

  ```python
  exporter = ServingExport(model, (8, 8, 1))
  for k in range(num_tasks):
    ...  # train task k
    exporter.write(f"/tmp/export/task_{k}")
  ```

  A model with a `preprocessor` (a wrapped KerasHub task) serves the raw
  inputs its preprocessor takes: strings (`text=True`) or images. The
  preprocessor is traced into the SavedModel; a KerasHub tokenizer's ops
  come from TensorFlow Text, so `import tensorflow_text` before
  `tf.saved_model.load` of such an export.

  Args:
    model: the Keras model.
    input_shape: shape of one input, without the batch axis.
    text: the inputs are strings (input `text`, shape `(None,)`), else
      float32 images (input `image`).
  """

  def __init__(self, model, input_shape, text=False):
    self.model = model
    self.spec = (tf.TensorSpec((None,), tf.string, name="text") if text else
                 tf.TensorSpec((None,) + tuple(input_shape), tf.float32,
                               name="image"))
    self._heads = None
    self._archive = None

  def write(self, path, heads=None):
    """Writes a SavedModel with a `serve` signature and one per task head.

    The directory appears complete or not at all: it is written beside
    `path` and renamed into place.

    Args:
      path: target directory; replaced if it exists.
      heads: optional dict of signature name → `(start, stop)` output slice;
        `serve` returns all outputs.
    """
    heads = dict(heads or {})
    if self._archive is None or heads != self._heads:
      self._archive, self._heads = self._traced(heads), heads
    staging = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    self._archive.write_out(staging, verbose=False)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(staging, path)

  def _traced(self, heads):
    model = self.model
    preprocessor = getattr(model, "preprocessor", None)

    def outputs(inputs):
      if preprocessor is not None:
        inputs = preprocessor(inputs)
        if isinstance(inputs, tuple):  # (x, y, sample_weight)
          inputs = inputs[0]
      return model(inputs, training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", outputs, input_signature=[self.spec])
    for name, (start, stop) in heads.items():
      archive.add_endpoint(
          name, lambda inputs, start=start, stop=stop: outputs(
              inputs)[:, start:stop],
          input_signature=[self.spec])
    return archive


def export_serving(model, path, input_shape, heads=None):
  """Writes a SavedModel with a `serve` signature and one per task head.

  The directory appears complete or not at all: it is written beside `path`
  and renamed into place. To export one model repeatedly, keep a
  `ServingExport`.

  Example:

  ```python
  export_serving(model, "/tmp/export", (8, 8, 1), heads={"task_0": (0, 2)})
  served = tf.saved_model.load("/tmp/export")
  logits = served.signatures["task_0"](image=x)["output_0"]
  ```

  Args:
    model: the Keras model.
    path: target directory; replaced if it exists.
    input_shape: shape of one input, without the batch axis.
    heads: optional dict of signature name → `(start, stop)` output slice;
      `serve` returns all outputs.
  """
  ServingExport(model, input_shape).write(path, heads)
