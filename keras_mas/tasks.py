"""Task sequences for continual learning: a data source × a recipe × a scenario.

Sources: `"digits"` (scikit-learn's 1,797 8×8 digits, bundled, the default)
or any TFDS dataset name (loaded with `tfds.load`). Recipes: `"split"`
(disjoint groups of classes), `"permuted"` (a fixed seeded pixel permutation
per task, the first task unpermuted), `"rotated"` (task `t` rotated by
`t · max_angle / (T − 1)` degrees) and `"datasets"` (one whole dataset per
task, named by a comma-separated source). Scenarios decide which outputs a
task trains and is scored on (see `Task.output_slice`):

* `"task"`: task-incremental, one head per task, the task id known.
* `"domain"`: domain-incremental, one shared head, labels `0..C−1`.
* `"class"`: class-incremental, one head whose classes grow with the tasks.

Every split, permutation and shuffle is drawn from `seed`.
"""

import dataclasses

import numpy as np

__all__ = [
    "RECIPES", "SCENARIOS", "Task", "TaskSequence", "load_source",
    "make_sequence",
]

RECIPES = ("split", "permuted", "rotated", "datasets")
SCENARIOS = ("task", "domain", "class")
_TEST_FRACTION = 0.25


@dataclasses.dataclass
class Task:
  """One task: its data with labels local to it, and where its outputs lie.

  Labels `y_*` are in `0..num_classes−1` for every scenario; `label_offset`
  is added for the scenario's loss, and outputs `[start, stop)` of the model
  are the ones the task trains and is scored on.
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

  @property
  def output_slice(self):
    return (self.start, self.stop)


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


def load_source(name, seed=0, data_dir=None):
  """Loads a source as float32 images in [0, 1], shape (N, H, W, C).

  Args:
    name: `"digits"` or a TFDS dataset name with `train` and `test` splits
      and `image`/`label` features.
    seed: seeds the train/test split of `digits`.
    data_dir: TFDS data directory.

  Returns:
    `(x_train, y_train, x_test, y_test)` as NumPy arrays.

  Raises:
    ValueError: if `name` is not `digits` and not a TFDS dataset.
  """
  if name == "digits":
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * _TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # Registered datasets, and ones prepared in `data_dir` by the user.
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # tfds.core.registered.DatasetNotFoundError
    raise ValueError(
        "Invalid value for argument `dataset`. Expected 'digits' or a TFDS "
        f"dataset name. Received: dataset={name!r}") from e
  features = getattr(builder.info, "features", None) or {}
  if "image" not in features or "label" not in features:
    raise ValueError(
        "Invalid value for argument `dataset`. Expected a TFDS dataset with "
        f"'image' and 'label' features. Received: dataset={name!r} with "
        f"features {sorted(features)}")
  splits = tfds.load(name, split=["train", "test"], data_dir=data_dir)
  (x_train, y_train), (x_test, y_test) = (
      _to_numpy(s.map(lambda e: (e["image"], e["label"]))) for s in splits)

  def images(x):
    x = np.asarray(x)
    if x.ndim == 3:
      x = x[..., None]
    return (x.astype("float32") / 255.0 if x.dtype == np.uint8
            else x.astype("float32"))

  return (images(x_train), np.asarray(y_train, "int64"),
          images(x_test), np.asarray(y_test, "int64"))


def _to_numpy(dataset):
  images, labels = [], []
  for x, y in dataset.batch(4096).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


def make_sequence(dataset="digits", recipe="split", scenario="domain",
                  num_tasks=5, seed=0, max_angle=90.0, data_dir=None):
  """Builds a seeded task sequence.

  Example:

  ```python
  sequence = keras_mas.tasks.make_sequence("digits", "permuted", "domain", 3)
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
  sources = [load_source(n, seed=seed, data_dir=data_dir) for n in names]

  if recipe == "split":
    parts = _split_by_classes(sources[0], num_tasks, dataset)
  elif recipe == "permuted":
    parts = _permuted(sources[0], num_tasks, rng)
  elif recipe == "rotated":
    parts = _rotated(sources[0], num_tasks, max_angle)
  else:
    parts = _datasets(names, sources)

  tasks = []
  offset = 0
  widest = max(p[5] for p in parts)
  for name, x_tr, y_tr, x_te, y_te, num_classes in parts:
    order = rng.permutation(len(x_tr))
    x_tr, y_tr = x_tr[order], y_tr[order]
    if scenario == "task":
      start, stop, label_offset = offset, offset + num_classes, 0
    elif scenario == "class":
      start, stop, label_offset = 0, offset + num_classes, offset
    else:
      start, stop, label_offset = 0, widest, 0
    tasks.append(Task(name, x_tr, y_tr, x_te, y_te, num_classes, start, stop,
                      label_offset))
    offset += num_classes
  num_outputs = widest if scenario == "domain" else offset
  return TaskSequence(tasks, dataset, recipe, scenario, num_outputs,
                      tuple(parts[0][1].shape[1:]))


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
      return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

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


def _datasets(names, sources):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width = sources[0][0].shape[1:3]
  channels = max(s[0].shape[-1] for s in sources)

  def fit_shape(x):
    if x.shape[1:3] != (height, width):
      x = tf.image.resize(x, (height, width)).numpy()
    if x.shape[-1] != channels:
      x = np.repeat(x, channels // x.shape[-1], axis=-1)
    return x.astype("float32")

  return [(name, fit_shape(x_tr), y_tr, fit_shape(x_te), y_te,
           int(max(y_tr.max(), y_te.max())) + 1)
          for name, (x_tr, y_tr, x_te, y_te) in zip(names, sources)]
