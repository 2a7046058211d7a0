"""`ScalarMean`: the running mean of one scalar a step, MAS's logged terms.

`MASModel` logs the task loss and the penalty (`task_loss`, `mas_penalty`)
beside Keras's `loss`: one scalar each a step. TensorFlow and JAX trace
`keras.metrics.Mean`'s update into their compiled step, where it costs
nothing; PyTorch runs it eagerly, and its generic path (shape checks,
casts, `keras.ops` dispatch) took about 50 µs an update and 30 µs a read,
a tenth of the penalty's whole cost on the benchmark's transformer
(benchmarks/BACKENDS.md). On PyTorch `ScalarMean` adds a scalar and reads
the mean with two in-place tensor operations and one division.
"""

import keras
from keras.src.backend import in_stateless_scope

from keras_mas import _backend

if _backend.TORCH:
  import torch  # pylint: disable=g-import-not-at-top

__all__ = ["ScalarMean"]


class ScalarMean(keras.metrics.Mean):
  """`keras.metrics.Mean`, with a fast eager path for unweighted scalars.

  Example:

  ```python
  tracker = ScalarMean(name="mas_penalty")
  tracker.update_state(0.5)
  tracker.update_state(1.5)
  tracker.result()  # 1.0
  ```

  Its arguments are `keras.metrics.Mean`'s (`name`, `dtype`).
  """

  def update_state(self, values, sample_weight=None):
    if not _eager_torch(values, sample_weight):
      return super().update_state(values, sample_weight=sample_weight)
    with torch.no_grad():
      self.total.value.add_(values.detach().to(self.total.value.dtype))
      self.count.value.add_(1)
    return None

  def result(self):
    if not _backend.TORCH or in_stateless_scope():
      return super().result()
    total, count = self.total.value, self.count.value
    with torch.no_grad():
      # A zero count has a zero total: 0, as `divide_no_nan`.
      return total / torch.where(count == 0, 1.0, count)


def _eager_torch(values, sample_weight):
  """Whether the update can take the fast path: PyTorch, outside a
  stateless scope, one scalar tensor, no weight."""
  return (_backend.TORCH and sample_weight is None
          and isinstance(values, torch.Tensor) and values.ndim == 0
          and not in_stateless_scope())
