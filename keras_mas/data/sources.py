"""Data sources: where a task sequence's images come from.

* `"digits"`: scikit-learn's 1,797 8×8 digits, bundled, the default.
* `"fashion_mnist"`: Fashion-MNIST from the IDX files of Debian's
  `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/`)
  when present, offline; from TFDS otherwise.
* `"idx:DIR"`: any MNIST-format directory (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
  `t10k-labels-idx1-ubyte`, each optionally `.gz`).
* any other name: a TFDS dataset with `image` and `label` features,
  registered or prepared in `data_dir`.

Every source gives `(x_train, y_train, x_test, y_test)`: float32 images in
[0, 1] of shape `(N, H, W, C)` and int64 labels. `load_image_folder` reads
the user's own images, one subfolder per class
(`keras.utils.image_dataset_from_directory`). `read_task_spec` runs a small
Python file of the user's that names `tf.data` pipelines or TFRecord files,
streamed, never loaded whole (see `keras_mas.data.tasks.from_spec`).
"""

import gzip
import importlib.util
import os

import numpy as np

from keras_mas.data import digits

__all__ = ["FASHION_MNIST_DIR", "load", "load_idx", "load_image_folder",
           "load_importance_data", "load_model", "preset_backbone_class",
           "read_idx", "read_task_spec"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_TEST_FRACTION = 0.25
_COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}
_IMAGE_TYPES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_TEXT_TYPES = (".txt",)
# IDX type codes (http://yann.lecun.com/exdb/mnist/): big-endian values.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
              0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path):
  """Reads one IDX file (as MNIST is distributed), gzipped or not.

  Example:

  ```python
  labels = read_idx("/usr/share/datasets/fashion-mnist/"
                    "t10k-labels-idx1-ubyte.gz")  # shape (10000,), uint8
  ```

  Args:
    path: the file; a name ending in `.gz` is decompressed.

  Returns:
    A NumPy array of the file's shape and type.

  Raises:
    ValueError: naming the file, if it is not a well-formed IDX file.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(
        f"Invalid IDX file {path!r}: cannot be read ({e}).") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in (
      _IDX_TYPES):
    raise ValueError(
        f"Invalid IDX file {path!r}: expected the magic number 0x0000TTDD "
        f"(TT a type code in {sorted(_IDX_TYPES)}). Received: "
        f"{data[:4].hex() or 'an empty file'}")
  dtype = np.dtype(_IDX_TYPES[data[2]])
  rank = data[3]
  header = 4 + 4 * rank
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if rank == 0 or len(shape) != rank or len(data) != expected:
    raise ValueError(
        f"Invalid IDX file {path!r}: the header says shape {shape} of "
        f"{dtype}, {expected} bytes in all; the file has {len(data)}.")
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(
      dtype.newbyteorder("="))


def load_idx(directory):
  """Loads an MNIST-format directory as images in [0, 1] and labels.

  Example:

  ```python
  x_train, y_train, x_test, y_test = load_idx(FASHION_MNIST_DIR)
  x_train.shape  # (60000, 28, 28, 1)
  ```

  Args:
    directory: holding the four IDX files (see the module docstring).

  Returns:
    `(x_train, y_train, x_test, y_test)`: float32 `(N, H, W, C)` images
    (a channel axis is added to `(N, H, W)`), int64 labels.

  Raises:
    ValueError: naming the directory or file, for a missing file, a
      malformed one, or images and labels of different counts.
  """
  if not os.path.isdir(directory):
    raise ValueError(
        "Invalid value for argument `dataset`. Expected an MNIST-format "
        f"directory. Received: {directory!r} (no such directory)")
  present = set(os.listdir(directory))
  arrays = {}
  for key, stems in _IDX_FILES.items():
    found = [n for stem in stems for n in (stem, stem + ".gz")
             if n in present]
    if not found:
      raise ValueError(
          "Invalid value for argument `dataset`. Expected an MNIST-format "
          f"directory with {stems[0]}[.gz]. Received: {directory!r} "
          f"holding {sorted(present)[:8]}")
    arrays[key] = read_idx(os.path.join(directory, found[0]))
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
      raise ValueError(
          f"Invalid value for argument `dataset`. Expected {split} images "
          f"(N, H, W[, C]) and N labels in {directory!r}. Received: images "
          f"{x.shape}, labels {y.shape}")
  return (_images(arrays["x_train"]), arrays["y_train"].astype("int64"),
          _images(arrays["x_test"]), arrays["y_test"].astype("int64"))


def load_image_folder(directory, image_size, channels=3, seed=0,
                      labels=True, argument="task_dirs"):
  """Loads a folder of images, one subfolder per class, as arrays.

  A folder holding `train/` and `test/` subfolders (each with the same class
  subfolders) keeps that split; otherwise a seeded quarter of each folder's
  images is held out for testing.

  Example:

  ```python
  x_tr, y_tr, x_te, y_te, classes = load_image_folder("/data/cats_dogs",
                                                      (64, 64))
  ```

  Args:
    directory: the folder.
    image_size: `(height, width)` every image is resized to.
    channels: 1 (grey), 3 (RGB) or 4 (RGBA).
    seed: seeds the train/test split.
    labels: False reads every image of `directory` (subfolders included)
      unlabeled, and returns `(x, None, None, None, [])`.
    argument: the argument errors name.

  Returns:
    `(x_train, y_train, x_test, y_test, class_names)`: float32 images in
    [0, 1] of shape `(N, height, width, channels)`, int64 labels indexing
    the sorted `class_names`.

  Raises:
    ValueError: naming the folder, for a missing folder, one without class
      subfolders or images, or `train/` and `test/` of different classes.
  """
  import keras  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected a folder of "
        f"images. Received: {directory!r} (no such folder)")
  try:
    image_size = tuple(int(d) for d in image_size)
  except (TypeError, ValueError):
    image_size = ()
  if len(image_size) != 2 or min(image_size) < 1:
    raise ValueError(
        "Invalid value for argument `image_size`. Expected (height, width) "
        f"of positive integers. Received: image_size={image_size!r}")
  if channels not in _COLOR_MODES:
    raise ValueError(
        "Invalid value for argument `channels`. Expected 1, 3 or 4. "
        f"Received: channels={channels!r}")
  count = sum(f.lower().endswith(_IMAGE_TYPES)
              for _, _, files in os.walk(directory) for f in files)
  if not count:
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected images "
        f"({', '.join(_IMAGE_TYPES)}) in {directory!r}. Received: a folder "
        "without any")
  options = dict(image_size=image_size, color_mode=_COLOR_MODES[channels],
                 batch_size=None, shuffle=False, verbose=False)
  if not labels:
    dataset = keras.utils.image_dataset_from_directory(
        directory, labels=None, **options)
    return _images_from(dataset, labeled=False)[0], None, None, None, []

  def read(folder):
    dataset = keras.utils.image_dataset_from_directory(folder, **options)
    x, y = _images_from(dataset)
    return x, y, list(dataset.class_names)

  return _split_folder(directory, read, seed, argument)


def folder_kind(directory):
  """`"text"` or `"images"`: what the files under `directory` hold.

  Raises:
    ValueError: naming `task_dirs`, for a missing folder, one with both
      text and image files, or neither.
  """
  if not os.path.isdir(directory):
    raise ValueError(
        "Invalid value for argument `task_dirs`. Expected a folder of "
        f"images or text files. Received: {directory!r} (no such folder)")
  names = [f.lower() for _, _, files in os.walk(directory) for f in files]
  texts = sum(n.endswith(_TEXT_TYPES) for n in names)
  images = sum(n.endswith(_IMAGE_TYPES) for n in names)
  if bool(texts) == bool(images):
    raise ValueError(
        "Invalid value for argument `task_dirs`. Expected a folder of "
        f"images ({', '.join(_IMAGE_TYPES)}) or of text files "
        f"({', '.join(_TEXT_TYPES)}). Received: {directory!r} with "
        f"{images} images and {texts} text files")
  return "text" if texts else "images"


def load_text_folder(directory, seed=0, labels=True, argument="task_dirs"):
  """Loads a folder of text files, one subfolder per class, as strings.

  Read with `keras.utils.text_dataset_from_directory`; a folder holding
  `train/` and `test/` subfolders keeps that split, otherwise a seeded
  quarter is held out for testing (as `load_image_folder` does).

  Args:
    directory: the folder.
    seed: seeds the train/test split.
    labels: False reads every file (subfolders included) unlabeled, and
      returns `(x, None, None, None, [])`.
    argument: the argument errors name.

  Returns:
    `(x_train, y_train, x_test, y_test, class_names)`: arrays of Python
    strings, int64 labels indexing the sorted `class_names`.

  Raises:
    ValueError: naming the folder, for a missing folder, one without class
      subfolders or text files, or `train/` and `test/` of other classes.
  """
  import keras  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected a folder of text "
        f"files. Received: {directory!r} (no such folder)")
  options = dict(batch_size=None, shuffle=False, verbose=False)

  def read(folder, with_labels=True):
    dataset = keras.utils.text_dataset_from_directory(
        folder, labels="inferred" if with_labels else None, **options)
    if not with_labels:
      return _strings(list(dataset.as_numpy_iterator())), None, []
    pairs = list(dataset.as_numpy_iterator())
    return (_strings([p[0] for p in pairs]),
            np.array([p[1] for p in pairs], "int64"),
            list(dataset.class_names))

  if not labels:
    x, _, _ = read(directory, with_labels=False)
    return x, None, None, None, []
  return _split_folder(directory, read, seed, argument)


def _strings(values):
  return np.array([v.decode("utf-8") if isinstance(v, bytes) else v
                   for v in values], dtype=object)


def _split_folder(directory, read, seed, argument):
  """A labelled folder's train and test parts: `train/` and `test/`, or a
  seeded quarter held out."""
  subfolders = sorted(e for e in os.listdir(directory)
                      if os.path.isdir(os.path.join(directory, e)))
  if not subfolders:
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected one subfolder per "
        f"class in {directory!r}. Received: files but no subfolders")
  if {"train", "test"} <= set(subfolders):
    (x_tr, y_tr, names), (x_te, y_te, test_names) = (
        read(os.path.join(directory, split)) for split in ("train", "test"))
    if names != test_names:
      raise ValueError(
          f"Invalid value for argument `{argument}`. Expected the same class "
          f"subfolders in train/ and test/ of {directory!r}. Received: "
          f"{names} and {test_names}")
    return x_tr, y_tr, x_te, y_te, names
  x, y, names = read(directory)
  if len(x) < 2:
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected two or more "
        f"files in {directory!r} (a train and a test part). Received: "
        f"{len(x)}")
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, int(len(x) * _TEST_FRACTION))
  test, train = order[:n_test], order[n_test:]
  return x[train], y[train], x[test], y[test], names


def load_model(path):
  """Loads the user's trained model: a `.keras` file or a KerasHub preset.

  A `.keras` file loads in safe mode (none of its code runs). A directory
  is a KerasHub preset (`save_to_preset`, or a downloaded one) holding a
  task model (`task.json`: a `TextClassifier`, `CausalLM`,
  `ImageClassifier`, ...), loaded with its preprocessor by its own class's
  `from_preset`.

  Args:
    path: a `.keras` file or a preset directory.

  Returns:
    The `keras.Model`.

  Raises:
    ValueError: naming `init_model`, if the file is missing or not a Keras
      model, or the directory is not a preset with a task model.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import keras_mas  # pylint: disable=g-import-not-at-top,unused-import
  if os.path.isdir(path):
    return _load_preset(path)
  if not os.path.isfile(path):
    raise ValueError(
        "Invalid value for argument `init_model`. Expected a .keras model "
        f"file or a KerasHub preset directory. Received: {path!r} (no such "
        "file)")
  try:
    model = keras.models.load_model(path, compile=False, safe_mode=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `init_model`. Expected a .keras model "
        f"file. Received: {path!r}, which does not load as one "
        f"({type(e).__name__}: {e})") from e
  if not isinstance(model, keras.Model):
    raise ValueError(
        "Invalid value for argument `init_model`. Expected a Keras model. "
        f"Received: {path!r} holding a {type(model).__name__}")
  return model


def preset_backbone_class(path):
  """The backbone class of the KerasHub preset in directory `path` (from its
  `config.json`), or None where `path` holds none or it does not import."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
    return getattr(importlib.import_module(config["module"]),
                   config["class_name"])
  except (OSError, ValueError, KeyError, ImportError, AttributeError,
          TypeError):
    return None


def _load_preset(path):
  """The task model of a KerasHub preset directory, with its preprocessor."""
  config_path = os.path.join(path, "task.json")
  if not os.path.isfile(config_path):
    raise ValueError(
        "Invalid value for argument `init_model`. Expected a KerasHub preset "
        f"directory with a task model (task.json). Received: {path!r}, "
        + ("a preset of a backbone alone: load it into a task "
           "(e.g. keras_hub.models.TextClassifier.from_preset(path, "
           "num_classes=...)) and save that with save_to_preset"
           if os.path.isfile(os.path.join(path, "config.json"))
           else "not a preset"))
  try:
    import keras_hub  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ValueError(
        "Invalid value for argument `init_model`. Expected keras-hub "
        f"installed to load the preset {path!r}. Received: {e}") from e
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    task_class = getattr(importlib.import_module(config["module"]),
                         config["class_name"])
    return task_class.from_preset(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "Invalid value for argument `init_model`. Expected a KerasHub preset "
        f"directory with a task model. Received: {path!r}, which does not "
        f"load as one ({type(e).__name__}: {e})") from e


def load_importance_data(spec, input_shape, seed=0, data_dir=None):
  """The data a model was deployed on, for importance before new tasks.

  Args:
    spec: an image or text folder (with class subfolders: labelled;
      without: unlabelled), or a source name (see `load`), whose test split
      is used.
    input_shape: `(height, width, channels)` the model takes (folder images
      are resized to it), or `()` for text.
    seed: seeds a folder's split (its parts are joined again).
    data_dir: TFDS data directory.

  Returns:
    `(inputs, labels)`, or the inputs alone when there are no labels.

  Raises:
    ValueError: naming `importance_data`, for a missing or empty source or
      inputs of another shape than `input_shape`.
  """
  if os.path.isdir(spec):
    has_classes = any(os.path.isdir(os.path.join(spec, e))
                      for e in os.listdir(spec))
    try:
      kind = folder_kind(spec)
    except ValueError as e:
      raise ValueError(str(e).replace("argument `task_dirs`",
                                      "argument `importance_data`")) from e
    if kind == "text":
      x_tr, y_tr, x_te, y_te, _ = load_text_folder(
          spec, seed=seed, labels=has_classes, argument="importance_data")
    elif len(input_shape) != 3:
      raise ValueError(
          "Invalid value for argument `importance_data`. Expected text, as "
          f"the tasks are. Received: {spec!r}, a folder of images")
    else:
      height, width, channels = input_shape
      x_tr, y_tr, x_te, y_te, _ = load_image_folder(
          spec, (height, width), channels=channels, seed=seed,
          labels=has_classes, argument="importance_data")
    data = ((np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te]))
            if has_classes else x_tr)
  else:
    try:
      _, _, x, y = load(spec, seed=seed, data_dir=data_dir)
    except ValueError as e:
      raise ValueError(str(e).replace("argument `dataset`",
                                      "argument `importance_data`")) from e
    data = (x, y)
  x = data[0] if isinstance(data, tuple) else data
  if tuple(x.shape[1:]) != tuple(input_shape):
    raise ValueError(
        "Invalid value for argument `importance_data`. Expected inputs of "
        f"shape {tuple(input_shape)}, the model's. Received: {spec!r} with "
        f"inputs of shape {tuple(x.shape[1:])}")
  return data


def _images_from(dataset, labeled=True):
  batches = list(dataset.batch(256).as_numpy_iterator())
  if labeled:
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches]).astype("int64")
  else:
    x, y = np.concatenate(batches), None
  return (x / 255.0).astype("float32"), y


def load(name, seed=0, data_dir=None, splits=None):
  """Loads a source by name (see the module docstring).

  Args:
    name: `"digits"`, `"fashion_mnist"`, `"idx:DIR"` or a TFDS name.
    seed: seeds the train/test split of `digits`.
    data_dir: TFDS data directory.
    splits: for a TFDS dataset, the `(train, test)` split names in TFDS's
      split syntax (e.g. `("train[:10%]", "validation")`); default
      `("train", "test")`. Giving them reads `fashion_mnist` from TFDS.

  Returns:
    `(x_train, y_train, x_test, y_test)` as NumPy arrays.

  Raises:
    ValueError: naming the argument, for an unknown or malformed source.
  """
  if splits is not None:
    splits = tuple(splits)
    if len(splits) != 2 or not all(isinstance(p, str) and p for p in splits):
      raise ValueError(
          "Invalid value for argument `splits`. Expected (train, test) TFDS "
          f"split names. Received: splits={splits!r}")
    if name == "digits" or (isinstance(name, str) and name.startswith(
        "idx:")):
      raise ValueError(
          "Invalid value for argument `splits`. Expected them only for a "
          f"TFDS dataset. Received: splits={splits!r} for dataset={name!r}")
    return _load_tfds(name, data_dir, splits)
  if name == "digits":
    images, labels = digits.load_digits()
    x = (images / 16.0).astype("float32")[..., None]
    y = labels.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * _TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
  if isinstance(name, str) and name.startswith("idx:"):
    return load_idx(os.path.expanduser(name[4:]))
  if name == "fashion_mnist" and os.path.isdir(FASHION_MNIST_DIR):
    return load_idx(FASHION_MNIST_DIR)
  return _load_tfds(name, data_dir)


def _load_tfds(name, data_dir, splits=("train", "test")):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # Registered datasets, and ones prepared in `data_dir` by the user.
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # tfds.core.registered.DatasetNotFoundError
    raise ValueError(
        "Invalid value for argument `dataset`. Expected 'digits', "
        "'fashion_mnist', 'idx:DIR' or a TFDS dataset name. Received: "
        f"dataset={name!r}") from e
  features = getattr(builder.info, "features", None) or {}
  if "image" not in features or "label" not in features:
    raise ValueError(
        "Invalid value for argument `dataset`. Expected a TFDS dataset with "
        f"'image' and 'label' features. Received: dataset={name!r} with "
        f"features {sorted(features)}")
  try:
    parts = tfds.load(name, split=list(splits), data_dir=data_dir)
  except (ValueError, KeyError) as e:
    raise ValueError(
        "Invalid value for argument `splits`. Expected split names of "
        f"{name!r} ({sorted(builder.info.splits)}). Received: "
        f"splits={tuple(splits)!r} ({e})") from e
  (x_train, y_train), (x_test, y_test) = (
      _to_numpy(s.map(lambda e: (e["image"], e["label"]))) for s in parts)
  return (_images(x_train), np.asarray(y_train, "int64"),
          _images(x_test), np.asarray(y_test, "int64"))


def _to_numpy(dataset):
  images, labels = [], []
  for x, y in dataset.batch(4096).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


def _images(x):
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  return (x.astype("float32") / 255.0 if x.dtype == np.uint8
          else x.astype("float32"))


def read_task_spec(path):
  """Runs the user's task spec, a Python file, and reads what it names.

  The file defines `task_spec()`, returning a dict:

  * `"tasks"`: `{name: (train, test)}` in task order (or a list of
    `(train, test)`), where `train` and `test` are each a `tf.data.Dataset`
    of unbatched `(x, y)` elements, or TFRecord file patterns (a string or
    a list of them) that `"parse"` turns into such elements;
  * `"num_classes"`: one count for every task, or a list with one per task;
  * `"parse"` (for TFRecord patterns): a function of one serialized record
    returning `(x, y)`.

  Example spec:

  ```python
  import tensorflow as tf

  def parse(record):
    features = tf.io.parse_single_example(record, {
        "image": tf.io.FixedLenFeature([28, 28, 1], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.int64)})
    return features["image"], features["label"]

  def task_spec():
    return {"num_classes": 10, "parse": parse, "tasks": {
        "shop A": ("/data/a/train-*.tfrecord", "/data/a/test-*.tfrecord"),
        "shop B": ("/data/b/train-*.tfrecord", "/data/b/test-*.tfrecord")}}
  ```

  Args:
    path: the spec file.

  Returns:
    `(task_data, num_classes, names)`: a `(train, test)` pair of datasets
    per task, the class counts and the task names, as
    `keras_mas.data.tasks.from_datasets` takes them.

  Raises:
    ValueError: naming `task_spec`, for a missing file, one that fails to
      run or defines no `task_spec()`, a malformed return value, or a
      pattern no file matches.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def fail(expected, received):
    return ValueError(
        f"Invalid value for argument `task_spec`. Expected {expected}. "
        f"Received: {received}")

  if not os.path.isfile(path):
    raise fail("a Python file defining task_spec()", f"{path!r} (no such file)")
  module_spec = importlib.util.spec_from_file_location("keras_mas_task_spec",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    # The user's own file, run as the user asked.
    module_spec.loader.exec_module(module)
    make = getattr(module, "task_spec", None)
    if not callable(make):
      raise fail("a Python file defining task_spec()",
                 f"{path!r}, which defines no task_spec function")
    spec = make()
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise fail(f"{path!r} to run", f"{type(e).__name__}: {e}") from e
  if not isinstance(spec, dict) or not {"tasks", "num_classes"} <= set(spec):
    raise fail("task_spec() to return a dict with 'tasks' and 'num_classes'",
               f"{spec!r:.200}")
  entries = spec["tasks"]
  if isinstance(entries, dict):
    names, pairs = list(entries), list(entries.values())
  else:
    pairs = list(entries)
    names = [f"task {t}" for t in range(len(pairs))]
  parse = spec.get("parse")
  task_data = []
  for name, pair in zip(names, pairs):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise fail(f"(train, test) for task {name!r}", f"{pair!r:.200}")
    task_data.append(tuple(_spec_dataset(part, parse, name, fail, tf)
                           for part in pair))
  return task_data, spec["num_classes"], [str(n) for n in names]


def _spec_dataset(part, parse, name, fail, tf):
  """A spec's dataset, or the TFRecords its patterns match, parsed."""
  if isinstance(part, tf.data.Dataset):
    return part
  patterns = [part] if isinstance(part, str) else part
  if not isinstance(patterns, (list, tuple)) or not all(
      isinstance(p, str) for p in patterns):
    raise fail(f"a tf.data.Dataset or TFRecord file patterns for task "
               f"{name!r}", f"{part!r:.200}")
  if not callable(parse):
    raise fail(f"a 'parse' function for the TFRecord files of task {name!r}",
               f"parse={parse!r}")
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(os.path.expanduser(pattern)))
    if not matched:
      raise fail(f"TFRecord files for task {name!r}",
                 f"{pattern!r}, which matches no file")
    files += matched
  # Files in a fixed order, read one after another: sharding by element
  # and the seeded shuffles see one order on every worker.
  return tf.data.TFRecordDataset(files).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)
