"""Tests of keras_mas.hard_buffer: the hardest samples, in the train step."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import hard_buffer  # pylint: disable=g-import-not-at-top,wrong-import-position
import tolerances  # pylint: disable=g-import-not-at-top,wrong-import-position


def _crossentropy(labels, logits):
  """NumPy reference: per-sample sparse cross-entropy of logits (float64)."""
  logits = np.asarray(logits, dtype="float64")
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_norm = np.log(np.exp(shifted).sum(axis=-1))
  return log_norm - shifted[np.arange(len(labels)), labels]


def _own_loss(labels, outputs):
  """A loss chosen by the test: the output's first column."""
  del labels
  return outputs[:, 0]


def _step(buffer, x, y, outputs_of, traced=None):
  """One train step's use of the buffer: join, outputs, update."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def step(x, y):
    x_all, y_all, _ = buffer.join(x, y, None)
    buffer.update(x_all, y_all, outputs_of(x_all), tf.shape(x)[0])
    return x_all, y_all

  run = traced or step
  x_all, y_all = run(tf.constant(x), tf.constant(y))
  return x_all.numpy(), y_all.numpy()


class TestHardBuffer:

  def test_keeps_the_hardest_like_a_numpy_reference(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    buffer = hard_buffer.HardBuffer(7)
    weights = rng.standard_normal((3, 4)).astype("float32")

    @tf.function
    def traced(x, y):  # As in the train step: traced once, sizes vary.
      x_all, y_all, _ = buffer.join(x, y, None)
      buffer.update(x_all, y_all, tf.matmul(x_all, weights), tf.shape(x)[0])
      return x_all, y_all

    kept_x = np.zeros((0, 3), "float32")
    kept_y = np.zeros((0,), "int64")
    for size in (4, 5, 3, 5, 2, 5):
      x = rng.standard_normal((size, 3)).astype("float32")
      y = rng.integers(0, 4, size)
      x_all, y_all = _step(buffer, x, y, None, traced=traced)
      # Reference: the batch first, then the buffer; every sample's loss
      # on the same weights; the highest kept, the earlier on ties.
      ref_x, ref_y = np.concatenate([x, kept_x]), np.concatenate([y, kept_y])
      np.testing.assert_array_equal(x_all, ref_x)
      np.testing.assert_array_equal(y_all, ref_y)
      losses = _crossentropy(ref_y, ref_x @ weights)
      keep = np.argsort(-losses, kind="stable")[:7]
      kept_x, kept_y = ref_x[keep], ref_y[keep]
      np.testing.assert_array_equal(buffer.inputs, kept_x)
      np.testing.assert_array_equal(buffer.labels, kept_y)
      tolerances.assert_close(buffer.losses, losses[keep])
      tolerances.assert_close(buffer.incoming_loss, np.mean(losses[:size]))
      assert buffer.incoming_count == size
    assert len(buffer) == 7

  def test_newer_wins_ties_and_losses_are_measured_again(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    buffer = hard_buffer.HardBuffer(3, loss_fn=_own_loss)
    x = np.array([[0.1], [0.9], [0.5], [0.7]], "float32")
    _step(buffer, x, np.arange(4), lambda t: t)
    np.testing.assert_array_equal(buffer.labels, [1, 3, 2])
    # New losses for the buffer's samples too (its 0.9 is now 0.2); the
    # tie at 0.7 goes to the incoming sample.
    x_all, y_all = _step(buffer, np.array([[0.3], [0.7]], "float32"),
                         np.array([10, 11]),
                         lambda t: tf.constant([[0.3], [0.7], [0.2], [0.7],
                                                [0.5]]))
    np.testing.assert_array_equal(y_all, [10, 11, 1, 3, 2])
    np.testing.assert_array_equal(buffer.labels, [11, 3, 2])
    np.testing.assert_allclose(buffer.losses, [0.7, 0.7, 0.5])

  def test_without_rehearsal_kept_but_not_joined(self):
    buffer = hard_buffer.HardBuffer(2, loss_fn=_own_loss, rehearse=False)
    _step(buffer, np.array([[0.5], [0.1]], "float32"), np.array([0, 1]),
          lambda t: t)
    x_all, _ = _step(buffer, np.array([[0.3], [0.2]], "float32"),
                     np.array([2, 3]), lambda t: t)
    assert x_all.shape == (2, 1)  # The batch alone is trained on.
    # The kept sample's stored loss competes with the new ones.
    np.testing.assert_array_equal(buffer.labels, [0, 2])

  def test_updates_per_batch_repeat_the_batch_then_update_once(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    buffer = hard_buffer.HardBuffer(2, loss_fn=_own_loss, updates_per_batch=3)
    _step(buffer, np.array([[0.5], [0.1]], "float32"), np.array([0, 1]),
          lambda t: t)
    assert buffer.phase == 1 and len(buffer) == 0
    empty = (np.zeros((0, 1), "float32"), np.zeros((0,), "int64"))
    # Empty batches: the kept batch again; losses of the first step rank.
    x_all, y_all = _step(buffer, *empty, lambda t: t * 0.0)
    np.testing.assert_array_equal(y_all, [0, 1])
    _step(buffer, *empty, lambda t: t * 0.0)
    assert buffer.phase == 0
    np.testing.assert_array_equal(buffer.labels, [0, 1])
    np.testing.assert_allclose(buffer.losses, [0.5, 0.1])
    np.testing.assert_allclose(buffer.incoming_loss, 0.3)
    # A non-empty batch where an empty one is due is refused.
    _step(buffer, np.array([[0.4]], "float32"), np.array([2]), lambda t: t)
    x_all, _ = _step(buffer, *empty, lambda t: t)
    assert x_all.shape == (3, 1)  # The kept batch of one and the buffer.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="repeat_updates"):
      _step(buffer, np.array([[0.4]], "float32"), np.array([2]), lambda t: t)

  def test_sample_weights_weigh_the_buffer_one(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    buffer = hard_buffer.HardBuffer(2, loss_fn=_own_loss)
    _step(buffer, np.array([[1.0], [3.0]], "float32"), np.array([0, 1]),
          lambda t: t)
    _, _, weights = buffer.join(tf.constant([[2.0]]), tf.constant([5]),
                                tf.constant([0.25]))
    np.testing.assert_array_equal(weights.numpy(), [0.25, 1.0, 1.0])

  def test_state_round_trip(self, tmp_path):
    buffer = hard_buffer.HardBuffer(2, loss_fn=_own_loss)
    _step(buffer, np.array([[1.0], [3.0], [2.0]], "float32"),
          np.array([0, 1, 2]), lambda t: t)
    np.savez(tmp_path / "buffer.npz", **buffer.get_state())
    restored = hard_buffer.HardBuffer(2)
    restored.set_state(dict(np.load(tmp_path / "buffer.npz")))
    for key, value in buffer.get_state().items():
      np.testing.assert_array_equal(restored.get_state()[key], value)
    np.testing.assert_array_equal(restored.labels, [1, 2])
    empty = hard_buffer.HardBuffer(2)
    empty.set_state(hard_buffer.HardBuffer(2).get_state())
    assert len(empty) == 0 and empty.get_state()["inputs"] is None

  def test_bad_input_changes_nothing(self):
    buffer = hard_buffer.HardBuffer(2, loss_fn=_own_loss)
    _step(buffer, np.array([[1.0], [0.0]], "float32"), np.array([1, 0]),
          lambda t: t)
    with pytest.raises(ValueError, match="`state`"):
      buffer.set_state({"inputs": np.zeros((3, 1)), "labels": np.zeros(3),
                        "losses": np.zeros(3)})
    with pytest.raises(ValueError, match="`state`"):
      buffer.set_state({"inputs": np.zeros((1, 2)), "labels": np.zeros(1),
                        "losses": np.zeros(1)})
    with pytest.raises(ValueError, match="`x`"):
      _step(buffer, np.zeros((1, 2), "float32"), np.array([0]), lambda t: t)
    np.testing.assert_array_equal(buffer.labels, [1, 0])
    with pytest.raises(ValueError, match="`capacity`"):
      hard_buffer.HardBuffer(0)
    with pytest.raises(ValueError, match="`loss_fn`"):
      hard_buffer.HardBuffer(2, loss_fn="mse")
    with pytest.raises(ValueError, match="`updates_per_batch`"):
      hard_buffer.HardBuffer(2, updates_per_batch=0)


# --------------------------------------------------------------------------
# Learning a stream with a real model, in `model.fit`.
