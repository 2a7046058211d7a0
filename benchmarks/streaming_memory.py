r"""Peak resident memory of a run as its dataset grows: streamed vs arrays.

  .venv/bin/python benchmarks/streaming_memory.py --sizes=10000,40000,160000
  .venv/bin/python benchmarks/streaming_memory.py --runner=task_free

For each size, generated 28×28 images of two domain-incremental tasks (half
the samples each, plus 1,000 test images per task) are written as TFRecords
(uint8 pixels, four files per split). Then, each in a fresh process, MAS
learns the two tasks for one epoch, evaluating and measuring importance on
all the data:

* `streaming`: `keras_mas.tasks.from_spec` over the TFRecords, so `fit`,
  evaluation and importance read `tf.data` pipelines batch by batch;
* `arrays`: the same records read whole into NumPy, `tasks.from_arrays`.

With `--runner=task_free` the two tasks are one stream learned task-free
(`keras_mas.experiments.streaming.run_stream`, task-free MAS, the hard
buffer, evaluation at the hidden boundaries and along the stream): the
stream is read from the pipelines; only the buffer's samples are held.

Reports each process's peak RSS (`ru_maxrss`), its growth over the smallest
size, and the ratio largest ÷ smallest size: flat (≈1) when streamed.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SIZES = flags.DEFINE_list("sizes", ["10000", "40000", "160000"],
                           "Training samples in all (two tasks).")
_MODES = flags.DEFINE_list("modes", ["streaming", "arrays"],
                           "'streaming' and/or 'arrays'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
_RUNNER = flags.DEFINE_enum("runner", "task_aware",
                             ["task_aware", "task_free"],
                             "Which runner learns the two tasks.")
_FOLDER = flags.DEFINE_string("folder", None, "Where the TFRecords go "
                              "(default: a temporary folder, deleted).")

_SHAPE = (28, 28, 1)
_CLASSES = 10
_TEST_PER_TASK = 1000
_FILES_PER_SPLIT = 4
_SPEC = '''
import glob, os
import tensorflow as tf

_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string),
             "label": tf.io.FixedLenFeature([], tf.int64)}


def parse(record):
  example = tf.io.parse_single_example(record, _FEATURES)
  image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), %r)
  return tf.cast(image, tf.float32) / 255.0, example["label"]


def task_spec():
  folder = os.path.dirname(os.path.abspath(__file__))
  return {"num_classes": %d, "parse": parse, "tasks": {
      task: (os.path.join(folder, f"{task}-train-*"),
             os.path.join(folder, f"{task}-test-*"))
      for task in ("a", "b")}}
''' % (_SHAPE, _CLASSES)


def _write(folder, size):
  """Two tasks of `size / 2` training images, written in chunks."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = int(np.prod(_SHAPE))
  for task in ("a", "b"):
    # Each class a noisy prototype; the two tasks differ by their prototypes.
    prototypes = rng.integers(0, 256, (_CLASSES, pixels))
    for split, count in (("train", size // 2), ("test", _TEST_PER_TASK)):
      bounds = np.linspace(0, count, _FILES_PER_SPLIT + 1).astype(int)
      for shard in range(_FILES_PER_SPLIT):
        path = os.path.join(folder, f"{task}-{split}-{shard}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
          for start in range(bounds[shard], bounds[shard + 1], 4096):
            n = min(4096, bounds[shard + 1] - start)
            y = rng.integers(0, _CLASSES, n)
            x = np.clip(prototypes[y] + rng.normal(0, 60, (n, pixels)), 0,
                        255).astype("uint8")
            for image, label in zip(x, y):
              writer.write(tf.train.Example(features=tf.train.Features(
                  feature={
                      "image": tf.train.Feature(bytes_list=tf.train.BytesList(
                          value=[image.tobytes()])),
                      "label": tf.train.Feature(int64_list=tf.train.Int64List(
                          value=[int(label)])),
                  })).SerializeToString())
  with open(os.path.join(folder, "spec.py"), "w") as f:
    f.write(_SPEC)


def _child(mode, folder, batch_size, runner):
  """One run in this process; prints its peak RSS as JSON."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from keras_mas.data import tasks  # pylint: disable=g-import-not-at-top
  from keras_mas.experiments import sequential as training  # pylint: disable=g-import-not-at-top
  sequence = tasks.from_spec(os.path.join(folder, "spec.py"), "domain")
  started = time.perf_counter()
  if mode == "arrays":
    parts = []
    for task in sequence.tasks:
      splits = []
      for split in ("train", "test"):
        batches = list(task.dataset(split).batch(4096).as_numpy_iterator())
        splits += [np.concatenate([b[0] for b in batches]),
                   np.concatenate([b[1] for b in batches])]
      parts.append(tuple(splits))
    sequence = tasks.from_arrays(parts, scenario="domain")
  workdir = tempfile.mkdtemp(prefix="keras_mas_memory_")
  if runner == "task_free":
    from keras_mas.experiments import streaming  # pylint: disable=g-import-not-at-top
    # One update a batch: the memory of a stream, at a benchmark's pace.
    results = streaming.run_stream(sequence, "mas", workdir=workdir,
                                   batch_size=batch_size, hidden_units=64,
                                   updates_per_batch=1)
  else:
    results = training.run_sequence(sequence, workdir, method="mas",
                                    epochs=1, batch_size=batch_size,
                                    hidden_units=64, verbose=0)
  print(json.dumps({
      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "seconds": time.perf_counter() - started,
      "acc": results["acc"]}))


def _measure(mode, folder):
  done = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child", mode, folder,
       str(_BATCH_SIZE.value), _RUNNER.value],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
      text=True, check=False)
  if done.returncode:
    raise RuntimeError(done.stderr[-3000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(_):
  import shutil  # pylint: disable=g-import-not-at-top
  sizes = [int(s) for s in _SIZES.value]
  rows = {}
  for size in sizes:
    folder = os.path.join(_FOLDER.value, str(size)) if _FOLDER.value else (
        tempfile.mkdtemp(prefix="keras_mas_records_"))
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "spec.py")):
      _write(folder, size)
    on_disk = sum(os.path.getsize(os.path.join(folder, f))
                  for f in os.listdir(folder))
    for mode in _MODES.value:
      rows[mode, size] = dict(_measure(mode, folder), disk=on_disk)
      print(f"{mode:>9} {size:>7} samples: peak RSS "
            f"{rows[mode, size]['peak_rss'] / 2**20:7.0f} MiB, "
            f"{rows[mode, size]['seconds']:6.1f} s, ACC "
            f"{rows[mode, size]['acc']:.3f}", flush=True)
    if not _FOLDER.value:
      shutil.rmtree(folder, ignore_errors=True)
  print()
  print("| training samples | records on disk | " + " | ".join(
      f"{m} peak RSS | {m} growth" for m in _MODES.value) + " |")
  print("|---:|---:|" + "---:|---:|" * len(_MODES.value))
  for size in sizes:
    cells = []
    for mode in _MODES.value:
      row, first = rows[mode, size], rows[mode, sizes[0]]
      cells += [f"{row['peak_rss'] / 2**20:.0f} MiB",
                f"{(row['peak_rss'] - first['peak_rss']) / 2**20:+.0f} MiB"]
    print(f"| {size:,} | {rows[_MODES.value[0], size]['disk'] / 2**20:.0f} "
          "MiB | " + " | ".join(cells) + " |")
  for mode in _MODES.value:
    ratio = rows[mode, sizes[-1]]["peak_rss"] / rows[mode, sizes[0]][
        "peak_rss"]
    print(f"{mode}: peak RSS at {sizes[-1]:,} ÷ at {sizes[0]:,} samples = "
          f"{ratio:.2f} (data ×{sizes[-1] / sizes[0]:.0f})")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
  else:
    app.run(main)
