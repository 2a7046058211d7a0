"""SavedModel export of the serving model, loadable without keras_mas."""

import os
import shutil

import keras
import tensorflow as tf

__all__ = ["export_serving"]


def export_serving(model, path, input_shape, heads=None):
  """Writes a SavedModel with a `serve` signature and one per task head.

  The directory appears complete or not at all: it is written beside `path`
  and renamed into place.

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
  spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name="image")
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(
      "serve", lambda image: model(image, training=False),
      input_signature=[spec])
  for name, (start, stop) in (heads or {}).items():
    archive.add_endpoint(
        name,
        lambda image, start=start, stop=stop: model(
            image, training=False)[:, start:stop],
        input_signature=[spec])
  staging = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  archive.write_out(staging, verbose=False)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(staging, path)
