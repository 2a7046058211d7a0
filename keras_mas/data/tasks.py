"""Task sequences for continual learning: a data source × a recipe × a scenario.

Sources (see `keras_mas.data.sources`): `"digits"` (scikit-learn's 1,797 8×8
digits, bundled, the default), `"fashion_mnist"` (offline from Debian's IDX
files when installed), `"idx:DIR"` (any MNIST-format directory) or any TFDS
dataset name (loaded with `tfds.load`). Recipes: `"split"`
(disjoint groups of classes), `"permuted"` (a fixed seeded pixel permutation
per task, the first task unpermuted), `"rotated"` (task `t` rotated by
`t · max_angle / (T − 1)` degrees) and `"datasets"` (one whole dataset per
task, named by a comma-separated source). Scenarios decide which outputs a
task trains and is scored on (see `Task.output_slice`):

* `"task"`: task-incremental, one head per task, the task id known.
* `"domain"`: domain-incremental, one shared head, labels `0..C−1`.
* `"class"`: class-incremental, one head whose classes grow with the tasks.

Every split, permutation and shuffle is drawn from `seed`.

The user's data: `from_arrays`, `from_folders` (image folders), and
streaming tasks that are never held whole, `from_datasets` (`tf.data`
pipelines) and `from_spec` (a Python file naming pipelines or TFRecords).
"""

import dataclasses
import os

import numpy as np

from keras_mas.data import pipelines
from keras_mas.data import sources

__all__ = [
    "RECIPES", "SCENARIOS", "Task", "TaskSequence", "from_arrays",
    "from_datasets", "from_folders", "from_spec", "load_source", "make_sequence",
]

RECIPES = ("split", "permuted", "rotated", "datasets")
SCENARIOS = ("task", "domain", "class")


@dataclasses.dataclass
class Task:
  """One task: its data with labels local to it, and where its outputs lie.

  Labels `y_*` are in `0..num_classes−1` for every scenario; `label_offset`
  is added for the scenario's loss, and outputs `[start, stop)` of the model
  are the ones the task trains and is scored on.

  A streaming task (`from_datasets`) has no arrays (`x_train` … are None):
  `train_data` and `test_data` are `tf.data` datasets of unbatched
  `(x, y)` elements, read batch by batch, never held whole; `label_check`
  casts and checks their batches.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  start: int
  stop: int
  label_offset: int
  train_data: object = None
  test_data: object = None

  @property
  def output_slice(self):
    return (self.start, self.stop)

  @property
  def streaming(self):
    """Whether the task's data are `tf.data` pipelines rather than arrays."""
    return self.train_data is not None

  @property
  def train_size(self):
    """Training elements, or None when a pipeline does not know its size."""
    if self.streaming:
      return pipelines.size(self.train_data)
    return len(self.x_train)

  @property
  def label_check(self):
    """`pipelines.label_check` of the task's classes, for its batches."""
    return pipelines.label_check(self.num_classes, self.name)

  def dataset(self, split):
    """The `"train"` or `"test"` split as a dataset of unbatched `(x, y)`."""
    if self.streaming:
      return self.train_data if split == "train" else self.test_data
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    x, y = ((self.x_train, self.y_train) if split == "train" else
            (self.x_test, self.y_test))
    return tf.data.Dataset.from_tensor_slices((x, y))


@dataclasses.dataclass
class TaskSequence:
  tasks: list
  dataset: str
  recipe: str
  scenario: str
  num_outputs: int
  input_shape: tuple

  def __len__(self):
    return len(self.tasks)

  @property
  def streaming(self):
    """Whether the tasks are `tf.data` pipelines (`from_datasets`)."""
    return any(t.streaming for t in self.tasks)

  @property
  def text(self):
    """Whether the inputs are strings (for a model with a preprocessor)."""
    task = self.tasks[0]
    if task.streaming:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      return task.train_data.element_spec[0].dtype == tf.string
    return _is_text(np.asarray(task.x_train))


def load_source(name, seed=0, data_dir=None, splits=None):
  """Loads a source as float32 images in [0, 1], shape (N, H, W, C).

  See `keras_mas.data.sources` for the names: `"digits"`, `"fashion_mnist"`
  (offline from Debian's IDX files when present), `"idx:DIR"` (any
  MNIST-format directory) or a TFDS dataset name.

  Args:
    name: the source's name.
    seed: seeds the train/test split of `digits`.
    data_dir: TFDS data directory.
    splits: `(train, test)` TFDS split names (TFDS datasets only).

  Returns:
    `(x_train, y_train, x_test, y_test)` as NumPy arrays.

  Raises:
    ValueError: naming the argument, for an unknown or malformed source.
  """
  return sources.load(name, seed=seed, data_dir=data_dir, splits=splits)


def make_sequence(dataset="digits", recipe="split", scenario="domain",
                  num_tasks=5, seed=0, max_angle=90.0, data_dir=None,
                  splits=None):
  """Builds a seeded task sequence.

  Example:

  ```python
  sequence = keras_mas.data.tasks.make_sequence("digits", "permuted", "domain", 3)
  for task in sequence.tasks:
    model.fit(task.x_train, task.y_train)
  ```

  Args:
    dataset: a source name (see `load_source`); for `recipe="datasets"`, a
      comma-separated list of them, one per task.
    recipe: one of `RECIPES`.
    scenario: one of `SCENARIOS`.
    num_tasks: number of tasks, >= 2 (for `"datasets"`, the number of names).
    seed: seeds splits, permutations and shuffles.
    max_angle: rotation of the last task for `recipe="rotated"`, in degrees.
    data_dir: TFDS data directory.
    splits: `(train, test)` TFDS split names, e.g. `("train[:20%]",
      "test")` (TFDS datasets only; default `("train", "test")`).

  Returns:
    A `TaskSequence`.

  Raises:
    ValueError: naming the argument, for an unknown recipe, scenario or
      dataset, or a task count the data cannot supply.
  """
  if recipe not in RECIPES:
    raise ValueError(
        f"Invalid value for argument `recipe`. Expected one of {RECIPES}. "
        f"Received: recipe={recipe!r}")
  if scenario not in SCENARIOS:
    raise ValueError(
        f"Invalid value for argument `scenario`. Expected one of "
        f"{SCENARIOS}. Received: scenario={scenario!r}")
  names = [n.strip() for n in dataset.split(",")] if recipe == "datasets" else [
      dataset]
  if recipe == "datasets":
    num_tasks = len(names)
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 2:
    raise ValueError(
        "Invalid value for argument `num_tasks`. Expected an integer >= 2. "
        f"Received: num_tasks={num_tasks!r}")
  rng = np.random.default_rng(seed)
  loaded = [load_source(n, seed=seed, data_dir=data_dir, splits=splits)
            for n in names]

  if recipe == "split":
    parts = _split_by_classes(loaded[0], num_tasks, dataset)
  elif recipe == "permuted":
    parts = _permuted(loaded[0], num_tasks, rng)
  elif recipe == "rotated":
    parts = _rotated(loaded[0], num_tasks, max_angle)
  else:
    parts = _datasets(names, loaded)

  return _assemble(parts, dataset, recipe, scenario, rng)


def _assemble(parts, dataset, recipe, scenario, rng):
  """The `TaskSequence` of `(name, x_tr, y_tr, x_te, y_te, classes)` parts."""
  tasks = []
  offset = 0
  widest = max(p[5] for p in parts)
  for name, x_tr, y_tr, x_te, y_te, num_classes in parts:
    order = rng.permutation(len(x_tr))
    # `np.take` copies into C order whatever the layout it reads; `x[order]`
    # on the permuted recipe's arrays measured 10x slower.
    x_tr, y_tr = np.take(x_tr, order, axis=0), y_tr[order]
    tasks.append(Task(name, x_tr, y_tr, x_te, y_te, num_classes,
                      *_outputs(scenario, offset, num_classes, widest)))
    offset += num_classes
  num_outputs = widest if scenario == "domain" else offset
  return TaskSequence(tasks, dataset, recipe, scenario, num_outputs,
                      tuple(parts[0][1].shape[1:]))


def _is_text(x):
  return x.dtype == object or x.dtype.kind in "US"


def _outputs(scenario, offset, num_classes, widest):
  """`(start, stop, label_offset)` of a task whose classes follow `offset`."""
  if scenario == "task":
    return offset, offset + num_classes, 0
  if scenario == "class":
    return 0, offset + num_classes, offset
  return 0, widest, 0


def _checked_tasks(scenario, task_data, names):
  """`task_data` and `names` as lists, after the checks every source shares."""
  if scenario not in SCENARIOS:
    raise ValueError(
        f"Invalid value for argument `scenario`. Expected one of "
        f"{SCENARIOS}. Received: scenario={scenario!r}")
  task_data = list(task_data)
  if not task_data:
    raise ValueError(
        "Invalid value for argument `task_data`. Expected one or more "
        "tasks. Received: none")
  names = list(names) if names is not None else [
      f"task {t}" for t in range(len(task_data))]
  return task_data, names


def from_datasets(task_data, num_classes, scenario="task", names=None,
                  dataset="datasets"):
  """A `TaskSequence` of `tf.data` pipelines, streamed, never materialized.

  Each task is a training and a test dataset of unbatched `(x, y)` elements
  (inputs of one fixed shape across tasks, integer labels local to the
  task). `training.run_sequence` shuffles (in a bounded buffer), batches
  and prefetches them; evaluation, importance, LwF's targets and joint
  rehearsal read them batch by batch, so data larger than memory trains.

  Example:

  ```python
  def records(pattern):
    return tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)).map(parse)

  sequence = keras_mas.data.tasks.from_datasets(
      [(records("a/train-*"), records("a/test-*")),
       (records("b/train-*"), records("b/test-*"))],
      num_classes=10, scenario="domain")
  ```

  Args:
    task_data: a list of `(train_dataset, test_dataset)`, one per task.
    num_classes: the number of classes, one for every task or a list with
      one per task.
    scenario: one of `SCENARIOS`.
    names: a name per task (default `"task 0"`, `"task 1"`, ...).
    dataset: recorded as the sequence's dataset.

  Returns:
    A `TaskSequence` with recipe `"datasets"` whose tasks are streaming
    (`Task.streaming`): their `x_train` … are None. The pipelines made
    from them cast inputs to float32 and check every batch's labels.

  Raises:
    ValueError: naming the task, for no tasks, something other
      than datasets of unbatched `(x, y)` elements, inputs of different
      shapes, an empty dataset, or labels out of range among the first
      elements.
  """
  task_data, names = _checked_tasks(scenario, task_data, names)
  classes = (list(num_classes) if isinstance(num_classes, (list, tuple))
             else [num_classes] * len(task_data))
  if len(names) != len(task_data) or len(classes) != len(task_data):
    raise ValueError(
        "Invalid value for argument `names`/`num_classes`. Expected one per "
        f"task ({len(task_data)}). Received: {len(names)} names, "
        f"{len(classes)} class counts")
  for count in classes:
    if not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(
          "Invalid value for argument `num_classes`. Expected a positive "
          f"integer per task. Received: num_classes={num_classes!r}")
  shape = None
  for name, data, count in zip(names, task_data, classes):
    if not isinstance(data, (list, tuple)) or len(data) != 2:
      raise ValueError(
          "Invalid value for argument `task_data`. Expected (train_dataset, "
          f"test_dataset) for task {name!r}. Received: {data!r}")
    for part in data:
      part_shape, _ = pipelines.check_elements(part, "task_data", name, count)
      if shape is None:
        shape = part_shape
      elif part_shape != shape:
        raise ValueError(
            "Invalid value for argument `task_data`. Expected inputs of one "
            f"shape {shape} in every task. Received: {part_shape} in task "
            f"{name!r}")
  widest = max(classes)
  tasks, offset = [], 0
  for name, (train, test), count in zip(names, task_data, classes):
    tasks.append(Task(name, None, None, None, None, int(count),
                      *_outputs(scenario, offset, count, widest),
                      train_data=train, test_data=test))
    offset += count
  num_outputs = widest if scenario == "domain" else offset
  return TaskSequence(tasks, dataset, "datasets", scenario, num_outputs,
                      shape)


def from_arrays(task_data, scenario="task", names=None, dataset="custom",
                seed=0):
  """A `TaskSequence` of the user's own data, one tuple of arrays per task.

  Example:

  ```python
  sequence = keras_mas.data.tasks.from_arrays(
      [(x_a, y_a, x_a_test, y_a_test), (x_b, y_b, x_b_test, y_b_test)],
      scenario="task")
  ```

  Args:
    task_data: a list of `(x_train, y_train, x_test, y_test)`, inputs of one
      shape `(N, H, W, C)` across tasks and integer labels `0..C_t−1` local
      to each task.
    scenario: one of `SCENARIOS` (`"domain"`: every task shares one head of
      the widest task's classes).
    names: a name per task (default `"task 0"`, `"task 1"`, ...).
    dataset: recorded as the sequence's dataset.
    seed: seeds the shuffle of each task's training data.

  Returns:
    A `TaskSequence` with recipe `"custom"`.

  Raises:
    ValueError: naming the task, for no tasks, inputs of
      different shapes, mismatched lengths, or labels that are not integers
      `0..C−1`.
  """
  task_data, names = _checked_tasks(scenario, task_data, names)
  if len(names) != len(task_data):
    raise ValueError(
        "Invalid value for argument `names`. Expected one per task "
        f"({len(task_data)}). Received: {len(names)}")
  parts = []
  shape = None
  for name, data in zip(names, task_data):
    if len(data) != 4:
      raise ValueError(
          "Invalid value for argument `task_data`. Expected (x_train, "
          f"y_train, x_test, y_test) for task {name!r}. Received: "
          f"{len(data)} items")
    x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in data)
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
      if (not (x.ndim == 4 or (x.ndim == 1 and _is_text(x)))
          or len(x) != len(y) or not len(x)):
        raise ValueError(
            "Invalid value for argument `task_data`. Expected images (N, H, "
            f"W, C) or N strings, and N labels, N > 0, in task {name!r} "
            f"({split}). Received: inputs {x.shape}, labels {y.shape}")
      if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.min() < 0:
        raise ValueError(
            "Invalid value for argument `task_data`. Expected integer labels "
            f">= 0 in task {name!r} ({split}). Received: labels of dtype "
            f"{y.dtype}, shape {y.shape}"
            + (f", smallest {y.min()}" if y.size else ""))
    if shape is None:
      shape = x_tr.shape[1:]
    for x, split in ((x_tr, "train"), (x_te, "test")):
      if x.shape[1:] != shape:
        raise ValueError(
            "Invalid value for argument `task_data`. Expected inputs of one "
            f"shape {shape} in every task. Received: {x.shape[1:]} in task "
            f"{name!r} ({split})")
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    dtype = object if _is_text(x_tr) else "float32"
    parts.append((name, x_tr.astype(dtype), y_tr.astype("int64"),
                  x_te.astype(dtype), y_te.astype("int64"), num_classes))
  return _assemble(parts, dataset, "custom", scenario,
                   np.random.default_rng(seed))


def from_folders(task_dirs, image_size, scenario="task", channels=3, seed=0):
  """A `TaskSequence` of the user's folders, one folder per task.

  Each folder holds one subfolder per class (and optionally `train/` and
  `test/` splits): images (see `sources.load_image_folder`) or text files
  (`.txt`, see `sources.load_text_folder`; the tasks' inputs are then
  strings, for a model with a preprocessor such as a KerasHub
  `TextClassifier`).

  Example:

  ```python
  sequence = keras_mas.data.tasks.from_folders(["/data/a", "/data/b"], (32, 32),
                                          scenario="domain")
  ```

  Args:
    task_dirs: the folders, in task order.
    image_size: `(height, width)` every image is resized to (unused for
      text).
    scenario: one of `SCENARIOS`; `"domain"` needs the same class
      subfolders in every task.
    channels: 1, 3 or 4.
    seed: seeds the train/test splits and shuffles.

  Returns:
    A `TaskSequence` with recipe `"folders"`, tasks named after the folders.

  Raises:
    ValueError: naming the folder, for no folders, a missing or empty
      folder, a folder of fewer than two classes, or (domain-incremental)
      different class sets.
  """
  task_dirs = list(task_dirs)
  if not task_dirs:
    raise ValueError(
        "Invalid value for argument `task_dirs`. Expected one or more "
        f"folders, one per task. Received: task_dirs={task_dirs!r}")
  kinds = [sources.folder_kind(d) for d in task_dirs]
  if len(set(kinds)) > 1:
    raise ValueError(
        "Invalid value for argument `task_dirs`. Expected folders of one "
        f"kind, all images or all text. Received: {dict(zip(task_dirs, kinds))}")
  loaded = [sources.load_text_folder(d, seed=seed) if kind == "text" else
            sources.load_image_folder(d, image_size, channels=channels,
                                      seed=seed)
            for d, kind in zip(task_dirs, kinds)]
  for folder, part in zip(task_dirs, loaded):
    if len(part[4]) < 2:
      raise ValueError(
          "Invalid value for argument `task_dirs`. Expected two or more "
          f"class subfolders in {folder!r}, a task to learn. Received: "
          f"{part[4]}")
  if scenario == "domain":
    for folder, part in zip(task_dirs[1:], loaded[1:]):
      if part[4] != loaded[0][4]:
        raise ValueError(
            "Invalid value for argument `task_dirs`. Expected the same class "
            "subfolders in every task for domain-incremental learning. "
            f"Received: {loaded[0][4]} in {task_dirs[0]!r}, {part[4]} in "
            f"{folder!r}")
  names = [os.path.basename(os.path.normpath(d)) for d in task_dirs]
  sequence = from_arrays([part[:4] for part in loaded], scenario=scenario,
                         names=names, dataset=",".join(task_dirs), seed=seed)
  sequence.recipe = "folders"
  return sequence


def from_spec(path, scenario="task"):
  """A streaming `TaskSequence` from the user's task spec file.

  See `keras_mas.data.sources.read_task_spec` for the file: a `task_spec()`
  function naming each task's `tf.data` pipelines or TFRecord files.

  Example:

  ```python
  sequence = keras_mas.data.tasks.from_spec("my_tasks.py", scenario="domain")
  ```

  Args:
    path: the spec file.
    scenario: one of `SCENARIOS`.

  Returns:
    A `TaskSequence` of streaming tasks (see `from_datasets`), its dataset
    recorded as the spec's path.

  Raises:
    ValueError: naming `task_spec` or `task_data`, for a bad spec or bad
      data (see `from_datasets`).
  """
  task_data, num_classes, names = sources.read_task_spec(path)
  return from_datasets(task_data, num_classes, scenario=scenario, names=names,
                       dataset=f"spec:{path}")


def _split_by_classes(source, num_tasks, dataset):
  x_tr, y_tr, x_te, y_te = source
  classes = np.unique(y_tr)
  per_task = len(classes) // num_tasks
  if per_task < 2:
    raise ValueError(
        "Invalid value for argument `num_tasks`. Expected at most "
        f"{len(classes) // 2} tasks of two or more classes for dataset "
        f"{dataset!r} ({len(classes)} classes). Received: "
        f"num_tasks={num_tasks}")
  parts = []
  for t in range(num_tasks):
    group = classes[t * per_task:(t + 1) * per_task]
    local = {c: i for i, c in enumerate(group)}
    tr, te = np.isin(y_tr, group), np.isin(y_te, group)
    relabel = np.vectorize(local.get, otypes=["int64"])
    parts.append((f"classes {'-'.join(str(c) for c in group)}", x_tr[tr],
                  relabel(y_tr[tr]), x_te[te], relabel(y_te[te]), per_task))
  return parts


def _permuted(source, num_tasks, rng):
  x_tr, y_tr, x_te, y_te = source
  num_classes = int(y_tr.max()) + 1
  size = int(np.prod(x_tr.shape[1:]))
  parts = []
  for t in range(num_tasks):
    perm = np.arange(size) if t == 0 else rng.permutation(size)

    def apply(x, perm=perm):
      # `np.take`: a C-ordered copy. `x[:, perm]` was not one, cost 6x as
      # much, and made the shuffle after it 10x slower.
      return np.take(x.reshape(len(x), -1), perm, axis=1).reshape(x.shape)

    parts.append((f"permutation {t}", apply(x_tr), y_tr, apply(x_te), y_te,
                  num_classes))
  return parts


def _rotated(source, num_tasks, max_angle):
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  x_tr, y_tr, x_te, y_te = source
  num_classes = int(y_tr.max()) + 1
  parts = []
  for t in range(num_tasks):
    angle = max_angle * t / (num_tasks - 1)

    def apply(x, angle=angle):
      if angle == 0:
        return x
      return ndimage.rotate(x, angle, axes=(1, 2), reshape=False, order=1,
                            mode="constant").astype("float32")

    parts.append((f"rotation {angle:g}", apply(x_tr), y_tr, apply(x_te), y_te,
                  num_classes))
  return parts


def _datasets(names, loaded):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width = loaded[0][0].shape[1:3]
  channels = max(s[0].shape[-1] for s in loaded)

  def fit_shape(x):
    if x.shape[1:3] != (height, width):
      x = tf.image.resize(x, (height, width)).numpy()
    if x.shape[-1] != channels:
      x = np.repeat(x, channels // x.shape[-1], axis=-1)
    return x.astype("float32")

  return [(name, fit_shape(x_tr), y_tr, fit_shape(x_te), y_te,
           int(max(y_tr.max(), y_te.max())) + 1)
          for name, (x_tr, y_tr, x_te, y_te) in zip(names, loaded)]
