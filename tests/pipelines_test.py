"""Tests of keras_mas.pipelines.array_batches (the streaming pipelines are
tested with the tasks that read them, in tasks_test and distribute_test)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import pipelines  # pylint: disable=g-import-not-at-top,wrong-import-position


def _epochs(dataset, count):
  return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(count)]


def _order(epoch):
  return np.concatenate([batch[1] for batch in epoch])


def test_every_sample_once_per_epoch_in_pairs():
  x = np.arange(70, dtype="float32").reshape(35, 2)
  y = np.arange(35, dtype="int64")
  for batches in _epochs(pipelines.array_batches(x, y, 8, seed=3), 2):
    assert [len(b[1]) for b in batches] == [8, 8, 8, 8, 3]
    xs = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(np.sort(_order(batches)), y)
    np.testing.assert_array_equal(xs, x[_order(batches)])  # rows stay paired


def test_reshuffled_each_epoch_and_seeded():
  x = np.arange(64, dtype="float32")[:, None]
  y = np.arange(64)

  def orders(seed):
    return [_order(epoch) for epoch in
            _epochs(pipelines.array_batches(x, y, 16, seed=seed), 2)]

  first, second = orders(0)
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, y)
  again = orders(0)
  np.testing.assert_array_equal(again[0], first)
  np.testing.assert_array_equal(again[1], second)
  assert not np.array_equal(orders(1)[0], first)


@pytest.mark.parametrize("count, sizes", [
    (38, [8, 8, 8, 8, 4]),  # 6 left over: cut to 4.
    (34, [8, 8, 8, 8]),     # 2 left over: fewer than 4, left out.
    (32, [8, 8, 8, 8])])
def test_last_batch_cut_to_a_multiple_drawn_anew_each_epoch(count, sizes):
  # As a mesh's data axis of 4 devices needs: every batch splits evenly.
  x = np.arange(count, dtype="float32")[:, None]
  y = np.arange(count)
  left_out = []
  for batches in _epochs(pipelines.array_batches(x, y, 8, seed=5,
                                                 multiple_of=4), 3):
    assert [len(b[1]) for b in batches] == sizes
    order = _order(batches)
    assert len(set(order)) == len(order)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]),
                                  x[order])
    left_out.append(sorted(set(y) - set(order)))
  if count % 8 % 4:
    assert len({tuple(l) for l in left_out}) > 1  # not the same samples


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-q"]))
