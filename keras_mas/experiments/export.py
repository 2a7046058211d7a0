"""Export of the serving model, loadable without keras_mas.

On TensorFlow and JAX (through jax2tf): a SavedModel. On PyTorch, whose Keras
SavedModel export needs `torch_xla`: one `torch.export` program per
endpoint (`serve.pt2`, and one per head), loaded with plain PyTorch's
`torch.export.load(path).module()`.
"""

import functools
import os
import shutil

from absl import logging
import keras
import tensorflow as tf

from keras_mas import _backend
from keras_mas.core import multi_process

__all__ = ["ServingExport", "export_serving"]


class ServingExport:
  """Writes a model's SavedModel again and again, tracing it once.

  A run exports after every task; the endpoints stay the same while the
  heads do (domain-incremental runs: always), so the traced archive is kept
  and only the current weights are written, which costs less than tracing
  a fresh archive (benchmarks/CHOICES.md). On PyTorch each `write` exports
  `torch.export` programs afresh (see below).

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

  On PyTorch, `path` holds `serve.pt2` and `<head>.pt2` for each head, for
  the CPU: `torch.export.load(os.path.join(path, "serve.pt2")).module()(x)`
  (`torch.export.passes.move_to_device_pass` moves a program to a GPU).
  A model with a preprocessor is not exported there (a warning says so):
  strings do not pass through `torch.export`.

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
    """Writes a SavedModel with a `serve` signature and one per task head
    (on PyTorch: a program each).

    The directory appears complete or not at all: it is written beside
    `path` and renamed into place.

    Args:
      path: target directory; replaced if it exists.
      heads: optional dict of signature name → `(start, stop)` output slice;
        `serve` returns all outputs.
    """
    heads = dict(heads or {})
    if _backend.TORCH:
      self._write_programs(path, heads)
      return
    # Across processes, each reads the weights gathered whole.
    with multi_process.whole_values(self.model):
      if self._archive is None or heads != self._heads:
        self._archive, self._heads = self._traced(heads), heads
      _written_in_place(path, lambda staging: self._archive.write_out(
          staging, verbose=False))

  def _write_programs(self, path, heads):
    """PyTorch: one `torch.export` program per endpoint, batch size free.

    A model with a preprocessor is not exported (a warning says so): its
    inputs, strings or raw images, do not pass through `torch.export`.
    """
    import torch  # pylint: disable=g-import-not-at-top
    from torch.export import passes  # pylint: disable=g-import-not-at-top

    model = self.model
    if (getattr(model, "preprocessor", None) is not None
        or self.spec.dtype != tf.float32):
      logging.warning(
          "Not exported to %s: on the PyTorch backend keras_mas exports "
          "`torch.export` programs, which take tensors; model '%s' takes "
          "raw inputs (strings or images through a preprocessor).", path,
          model.name)
      return
    sample = (keras.ops.zeros((2,) + tuple(self.spec.shape[1:])),)
    batch = ({0: torch.export.Dim("batch", min=1)},)

    def write(staging):
      os.makedirs(staging)
      for name, window in {"serve": None, **heads}.items():
        program = torch.export.export(_endpoint_type()(model, window), sample,
                                      dynamic_shapes=batch, strict=False)
        # Traced where Keras computes (a GPU, if any); saved for the CPU,
        # where a program is loaded by default.
        program = passes.move_to_device_pass(program, "cpu")
        torch.export.save(program, os.path.join(staging, f"{name}.pt2"))

    _written_in_place(path, write)

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


def _written_in_place(path, write):
  """`write(directory)` into a directory beside `path`, then renamed to
  `path` (replacing it): the directory appears complete or not at all."""
  staging = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  write(staging)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(staging, path)


@functools.cache
def _endpoint_type():
  """The PyTorch module of one endpoint (made when first needed: PyTorch is
  imported on its backend only)."""
  import torch  # pylint: disable=g-import-not-at-top

  class Endpoint(torch.nn.Module):
    """The model in inference mode, its outputs sliced to a head."""

    def __init__(self, model, window):
      super().__init__()
      self.model = model
      self.window = window

    def forward(self, inputs):
      outputs = self.model(inputs, training=False)
      if self.window is not None:
        outputs = outputs[:, self.window[0]:self.window[1]]
      return outputs

  return Endpoint


def export_serving(model, path, input_shape, heads=None):
  """Writes a SavedModel with a `serve` signature and one per task head
  (on PyTorch: `torch.export` programs, see `ServingExport`).

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
