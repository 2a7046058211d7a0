"""Data sources: the IDX reader, MNIST-format folders, Fashion-MNIST offline."""

import gzip
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import sources
from keras_mas import tasks


def _write_idx(path, array):
  """The IDX format written by hand: a NumPy reference for the reader."""
  codes = {"uint8": 0x08, "int8": 0x09, ">i2": 0x0B, ">i4": 0x0C,
           ">f4": 0x0D, ">f8": 0x0E}
  dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else (
      array.dtype)
  code = codes[dtype.name if dtype.itemsize == 1 else dtype.str]
  header = bytes([0, 0, code, array.ndim]) + np.array(
      array.shape, ">u4").tobytes()
  payload = header + array.astype(dtype).tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(payload)


def _mnist_dir(folder, n_train=40, n_test=12, side=6, classes=4, gz=True):
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(
          0, 256, (n_train, side, side)).astype("uint8"),
      "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(
          "uint8"),
      "t10k-images-idx3-ubyte": rng.integers(
          0, 256, (n_test, side, side)).astype("uint8"),
      "t10k-labels-idx1-ubyte": (np.arange(n_test) % classes).astype("uint8"),
  }
  os.makedirs(folder, exist_ok=True)
  for name, array in arrays.items():
    _write_idx(os.path.join(folder, name + (".gz" if gz else "")), array)
  return arrays


@pytest.mark.parametrize("array", [
    np.arange(24, dtype="uint8").reshape(2, 3, 4),
    np.array([-3, 0, 7], dtype="int8"),
    np.arange(6, dtype=">i4").reshape(3, 2) * -1000,
    np.linspace(-1, 1, 10).astype(">f4"),
    np.linspace(-1, 1, 4).astype(">f8").reshape(2, 2),
])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_every_type_plain_or_gzipped(tmp_path, array, suffix):
  path = str(tmp_path / f"a{suffix}")
  _write_idx(path, array)
  read = sources.read_idx(path)
  np.testing.assert_array_equal(read, array)
  assert read.shape == array.shape and read.dtype.isnative


@pytest.mark.parametrize("payload, message", [
    (b"", "an empty file"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic number"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "magic number"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05", r"shape \(3,\)"),
])
def test_read_idx_names_malformed_files(tmp_path, payload, message):
  path = str(tmp_path / "bad-idx1-ubyte")
  with open(path, "wb") as f:
    f.write(payload)
  with pytest.raises(ValueError, match=f"bad-idx1-ubyte.*{message}"):
    sources.read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_is_a_source_for_every_recipe(tmp_path, gz):
  arrays = _mnist_dir(str(tmp_path / "mine"), gz=gz)
  x_train, y_train, x_test, y_test = sources.load(f"idx:{tmp_path}/mine")
  assert x_train.shape == (40, 6, 6, 1) and x_train.dtype == np.float32
  np.testing.assert_allclose(x_train[..., 0] * 255,
                             arrays["train-images-idx3-ubyte"], atol=1e-4)
  np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])
  assert y_train.dtype == np.int64
  sequence = tasks.make_sequence(f"idx:{tmp_path}/mine", "split", "task", 2)
  assert sequence.input_shape == (6, 6, 1) and sequence.num_outputs == 4


def test_idx_directory_problems_are_named(tmp_path):
  with pytest.raises(ValueError, match="no such directory"):
    sources.load(f"idx:{tmp_path}/absent")
  folder = str(tmp_path / "partial")
  _mnist_dir(folder)
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
    sources.load(f"idx:{folder}")
  folder = str(tmp_path / "mismatched")
  _mnist_dir(folder)
  _write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"),
             np.zeros(3, "uint8"))
  with pytest.raises(ValueError, match=r"train images .*\(40, 6, 6\).*\(3,\)"):
    sources.load(f"idx:{folder}")


def write_image_folder(folder, classes=("a", "b"), per_class=6, side=8,
                       channels=1, seed=0):
  """PNG images, a subfolder per class; returns {class: [uint8 arrays]}."""
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  written = {}
  for c in classes:
    os.makedirs(os.path.join(folder, c), exist_ok=True)
    written[c] = []
    for i in range(per_class):
      image = rng.integers(0, 256, (side, side, channels)).astype("uint8")
      keras.utils.save_img(os.path.join(folder, c, f"{i}.png"), image,
                           scale=False)
      written[c].append(image)
  return written


def _flat_folder(folder):
  """Twelve images straight in `folder`, no class subfolders."""
  write_image_folder(folder + "_classes")
  os.makedirs(folder)
  for c in ("a", "b"):
    for f in os.listdir(os.path.join(folder + "_classes", c)):
      os.rename(os.path.join(folder + "_classes", c, f),
                os.path.join(folder, c + f))


def test_image_folder_reads_every_image_with_its_class(tmp_path):
  written = write_image_folder(str(tmp_path / "t"), classes=("cat", "dog"))
  x_tr, y_tr, x_te, y_te, names = sources.load_image_folder(
      str(tmp_path / "t"), (8, 8), channels=1)
  assert names == ["cat", "dog"] and x_tr.shape[1:] == (8, 8, 1)
  assert len(x_tr) + len(x_te) == 12 and len(x_te) == 3
  expected = {(tuple(im.ravel()), k) for k, c in enumerate(names)
              for im in written[c]}
  loaded = {(tuple(np.round(x.ravel() * 255).astype("uint8")), int(y))
            for x, y in zip(np.concatenate([x_tr, x_te]),
                            np.concatenate([y_tr, y_te]))}
  assert loaded == expected
  unlabeled = sources.load_image_folder(str(tmp_path / "t"), (4, 4),
                                        channels=3, labels=False)[0]
  assert unlabeled.shape == (12, 4, 4, 3)


def test_image_folder_keeps_its_own_train_and_test_split(tmp_path):
  write_image_folder(str(tmp_path / "t" / "train"), per_class=4)
  write_image_folder(str(tmp_path / "t" / "test"), per_class=2, seed=1)
  x_tr, _, x_te, y_te, names = sources.load_image_folder(
      str(tmp_path / "t"), (8, 8), channels=1)
  assert (len(x_tr), len(x_te), names) == (8, 4, ["a", "b"])
  np.testing.assert_array_equal(y_te, [0, 0, 1, 1])


def test_image_folder_problems_are_named(tmp_path):
  with pytest.raises(ValueError, match="`task_dirs`.*no such folder"):
    sources.load_image_folder(str(tmp_path / "absent"), (8, 8))
  os.makedirs(tmp_path / "empty" / "a")
  with pytest.raises(ValueError, match="`task_dirs`.*without any"):
    sources.load_image_folder(str(tmp_path / "empty"), (8, 8))
  _flat_folder(str(tmp_path / "flat"))
  with pytest.raises(ValueError, match="one subfolder per class"):
    sources.load_image_folder(str(tmp_path / "flat"), (8, 8))
  write_image_folder(str(tmp_path / "m" / "train"), classes=("a", "b"))
  write_image_folder(str(tmp_path / "m" / "test"), classes=("a", "c"))
  with pytest.raises(ValueError, match=r"same class.*\['a', 'b'\]"):
    sources.load_image_folder(str(tmp_path / "m"), (8, 8))
  with pytest.raises(ValueError, match="argument `image_size`"):
    sources.load_image_folder(str(tmp_path / "m"), (8,))


def test_folders_make_a_sequence_and_domain_tasks_need_one_class_set(
    tmp_path):
  write_image_folder(str(tmp_path / "day"), classes=("car", "truck"))
  write_image_folder(str(tmp_path / "night"), classes=("car", "truck"),
                     seed=1)
  write_image_folder(str(tmp_path / "zoo"), classes=("lion", "seal", "yak"),
                     seed=2)
  sequence = tasks.from_folders([str(tmp_path / "day"),
                                 str(tmp_path / "night")], (8, 8),
                                scenario="domain", channels=1)
  assert [t.name for t in sequence.tasks] == ["day", "night"]
  assert sequence.num_outputs == 2 and sequence.input_shape == (8, 8, 1)
  several = tasks.from_folders([str(tmp_path / "day"), str(tmp_path / "zoo")],
                               (8, 8), scenario="task", channels=1)
  assert [t.output_slice for t in several.tasks] == [(0, 2), (2, 5)]
  with pytest.raises(ValueError, match=r"same class.*\['lion', 'seal', "):
    tasks.from_folders([str(tmp_path / "day"), str(tmp_path / "zoo")], (8, 8),
                       scenario="domain", channels=1)
  one = tasks.from_folders([str(tmp_path / "night")], (8, 8), channels=1)
  assert [t.name for t in one.tasks] == ["night"] and one.num_outputs == 2
  with pytest.raises(ValueError, match="one or more folders"):
    tasks.from_folders([], (8, 8))
  write_image_folder(str(tmp_path / "cars"), classes=("car",), seed=3)
  with pytest.raises(ValueError, match=r"two or more class.*\['car'\]"):
    tasks.from_folders([str(tmp_path / "cars")], (8, 8))


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
  path = str(tmp_path / "notes.keras")
  with open(path, "w") as f:
    f.write("not a model")
  with pytest.raises(ValueError, match="`init_model`.*notes.keras"):
    sources.load_model(path)
  with pytest.raises(ValueError, match="no such file"):
    sources.load_model(str(tmp_path / "absent.keras"))


def test_importance_data_from_folders_and_sources(tmp_path):
  write_image_folder(str(tmp_path / "seen"), classes=("a", "b", "c"))
  x, y = sources.load_importance_data(str(tmp_path / "seen"), (4, 4, 1))
  assert x.shape == (18, 4, 4, 1) and sorted(set(y.tolist())) == [0, 1, 2]
  _flat_folder(str(tmp_path / "unlabeled"))
  x = sources.load_importance_data(str(tmp_path / "unlabeled"), (8, 8, 1))
  assert isinstance(x, np.ndarray) and x.shape == (12, 8, 8, 1)
  _mnist_dir(str(tmp_path / "idx"), side=6)
  x, y = sources.load_importance_data(f"idx:{tmp_path}/idx", (6, 6, 1))
  assert x.shape == (12, 6, 6, 1) and len(y) == 12
  with pytest.raises(ValueError, match=r"`importance_data`.*\(6, 6, 1\)"):
    sources.load_importance_data(f"idx:{tmp_path}/idx", (8, 8, 1))
  with pytest.raises(ValueError, match="`importance_data`"):
    sources.load_importance_data("no_such_dataset_xyz", (8, 8, 1))


@pytest.mark.skipif(
    not os.path.isdir(sources.FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed (tools/test.sh "
    "installs it: apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_loads_offline_from_debians_idx_files():
  x_train, y_train, x_test, y_test = sources.load("fashion_mnist")
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (
      10000, 28, 28, 1)
  assert x_train.dtype == np.float32 and 0 <= x_train.min() < x_train.max(
      ) <= 1
  # The published first labels: ankle boot, T-shirt, T-shirt, dress, ...
  np.testing.assert_array_equal(y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  np.testing.assert_array_equal(y_test[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
  np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)


_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples")


def _write_records(folder):
  sys.path.insert(0, _EXAMPLES)
  try:
    import write_records  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(_EXAMPLES)
  write_records.main(str(folder))


def test_task_spec_streams_tfrecord_files(tmp_path, monkeypatch):
  _write_records(tmp_path / "records")
  monkeypatch.setenv("KERAS_MAS_RECORDS", str(tmp_path / "records"))
  sequence = tasks.from_spec(os.path.join(_EXAMPLES, "task_spec.py"),
                             scenario="task")
  assert sequence.streaming and [t.name for t in sequence.tasks] == ["a", "b"]
  assert sequence.input_shape == (8, 8, 1) and sequence.num_outputs == 10
  assert [t.output_slice for t in sequence.tasks] == [(0, 5), (5, 10)]
  x_train, y_train, _, y_test = sources.load("digits")
  task = sequence.tasks[1]
  read = list(task.dataset("train").batch(4096).as_numpy_iterator())
  x, y = np.concatenate([b[0] for b in read]), np.concatenate(
      [b[1] for b in read])
  # Both shards, in order: exactly the digits 5-9, relabelled 0-4.
  np.testing.assert_array_equal(x, x_train[y_train >= 5])
  np.testing.assert_array_equal(y, y_train[y_train >= 5] - 5)
  assert sum(1 for _ in task.dataset("test")) == np.sum(y_test >= 5)
  assert task.train_size is None  # TFRecords: unknown until read.


def _spec(tmp_path, body):
  path = tmp_path / "spec.py"
  path.write_text("import tensorflow as tf\n" + body)
  return str(path)


_DATASET = ("tf.data.Dataset.from_tensor_slices((tf.zeros((4, 3)), "
            "tf.constant([0, 1, 0, 1])))")


@pytest.mark.parametrize("body, message", [
    (None, "no such file"),
    ("x = 1\n", "defines no task_spec function"),
    ("def task_spec():\n  return 1 / 0\n", "ZeroDivisionError"),
    ("def task_spec():\n  return {'tasks': []}\n", "'num_classes'"),
    ("def task_spec():\n  return {'num_classes': 2, 'tasks': [(1,)]}\n",
     r"\(train, test\) for task 'task 0'"),
    ("def task_spec():\n  return {'num_classes': 2, 'parse': abs, 'tasks': "
     "{'a': ('/no/such/*.tfrecord', '/no/such/*.tfrecord')}}\n",
     "matches no file"),
    ("def task_spec():\n  return {'num_classes': 2, 'tasks': "
     "{'a': ('/tmp/*', '/tmp/*')}}\n", "a 'parse' function"),
    (f"def task_spec():\n  return {{'num_classes': 1, 'tasks': "
     f"[({_DATASET}, {_DATASET})] * 2}}\n", "labels 0..0 in task 'task 0'"),
])
def test_bad_task_specs_are_named(tmp_path, body, message):
  path = str(tmp_path / "missing.py") if body is None else _spec(tmp_path,
                                                                  body)
  with pytest.raises(ValueError, match=message):
    tasks.from_spec(path)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
