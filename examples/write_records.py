r"""Writes the bundled digits as TFRecords of two tasks, for task_spec.py.

  python examples/write_records.py /tmp/keras_mas_records
  KERAS_MAS_RECORDS=/tmp/keras_mas_records python apps/sequential_finetune.py \
      --task_spec=examples/task_spec.py --scenario=task --workdir=/tmp/spec

Task `a` holds digits 0-4, task `b` digits 5-9 (labels 0-4 in each); each
split is written as two files, as a real dataset would be sharded.
"""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas.data import sources


def write(path, x, y):
  """Writes `(x, y)` as `tf.train.Example`s: `image` floats, `label` int."""
  with tf.io.TFRecordWriter(path) as writer:
    for image, label in zip(x, y):
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          "image": tf.train.Feature(float_list=tf.train.FloatList(
              value=image.ravel())),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(
              value=[int(label)])),
      })).SerializeToString())


def main(folder):
  x_train, y_train, x_test, y_test = sources.load("digits")
  os.makedirs(folder, exist_ok=True)
  for task, classes in (("a", range(0, 5)), ("b", range(5, 10))):
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
      keep = np.isin(y, classes)
      for shard, rows in enumerate(np.array_split(np.flatnonzero(keep), 2)):
        write(os.path.join(folder, f"{task}-{split}-{shard}.tfrecord"),
              x[rows], y[rows] - classes[0])


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/keras_mas_records")
