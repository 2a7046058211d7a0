"""What this machine's TensorFlow can run, found by trying.

Some CPUs lack a path others have: TensorFlow runs a channels-first
(`NCHW`) convolution on a CPU only through oneDNN, which it uses by default
on some x86 processors and not on others (`TF_ENABLE_ONEDNN_OPTS=1` forces
it). A test that needs such a path skips, saying why, where it is absent.
"""

import functools

import pytest


@functools.lru_cache(maxsize=None)
def channels_first_conv_error():
  """Why a channels-first convolution fails here, or None if it runs."""
  # pylint: disable-next=g-import-not-at-top
  import tensorflow as tf
  try:
    tf.nn.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 1, 1)), 1, "SAME",
                 data_format="NCHW")
  except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as e:
    # TensorFlow wraps the reason in the op's names: keep the sentence.
    return e.message.split("}}")[-1].split("[Op:")[0].strip()
  return None


def require_channels_first_conv():
  """Skips the calling test where TensorFlow cannot convolve `NCHW` here."""
  error = channels_first_conv_error()
  if error is not None:
    pytest.skip("channels-first convolution needs a GPU or oneDNN on this "
                f"CPU under TensorFlow; here: {error}")
