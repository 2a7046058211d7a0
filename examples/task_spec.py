"""A task spec: the user's TFRecord files as a task sequence, streamed.

Used with `apps/sequential_finetune.py --task_spec=examples/task_spec.py`;
the records are those examples/write_records.py writes, in the folder named
by $KERAS_MAS_RECORDS (default /tmp/keras_mas_records). Edit the patterns,
the features and the class count for your own data.
"""

import os

import tensorflow as tf

_FOLDER = os.environ.get("KERAS_MAS_RECORDS", "/tmp/keras_mas_records")
_FEATURES = {
    "image": tf.io.FixedLenFeature([8, 8, 1], tf.float32),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def parse(record):
  """One serialized `tf.train.Example` → `(image, label)`."""
  example = tf.io.parse_single_example(record, _FEATURES)
  return example["image"], example["label"]


def task_spec():
  return {
      "num_classes": 5,
      "parse": parse,
      "tasks": {
          name: (os.path.join(_FOLDER, f"{name}-train-*.tfrecord"),
                 os.path.join(_FOLDER, f"{name}-test-*.tfrecord"))
          for name in ("a", "b")
      },
  }
