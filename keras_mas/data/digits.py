"""scikit-learn's 1,797 8×8 digits, read without importing scikit-learn.

scikit-learn ships the digits as a CSV file inside its package; importing
scikit-learn to read it costs more than a second of start-up (SciPy and
more), a tenth of the default main job. The file is read directly where it
is found, through `sklearn.datasets.load_digits` otherwise.
"""

import importlib.util
import os

import numpy as np

__all__ = ["load_digits"]


def load_digits():
  """`(images, labels)`: float64 images `(1797, 8, 8)` in 0..16, int labels.

  The same arrays as `sklearn.datasets.load_digits()`'s `images` and
  `target`.

  Raises:
    ImportError: if scikit-learn is not installed.
  """
  path = _data_file()
  if path is None:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return digits.images, digits.target
  table = np.loadtxt(path, delimiter=",")
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _data_file():
  try:
    spec = importlib.util.find_spec("sklearn")
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      return path
  return None
