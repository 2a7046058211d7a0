"""The digits read from scikit-learn's file equal load_digits()."""

import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_mas import digits  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_the_file_gives_what_scikit_learn_gives():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  expected = datasets.load_digits()
  images, labels = digits.load_digits()
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.target)
  assert images.shape == (1797, 8, 8)


def test_reading_does_not_import_scikit_learn():
  # The module alone: the package imports Keras, which imports
  # scikit-learn for its wrappers when it is installed.
  code = ("import importlib.util, sys; spec = importlib.util."
          "spec_from_file_location('digits', 'keras_mas/data/digits.py'); "
          "module = importlib.util.module_from_spec(spec); "
          "spec.loader.exec_module(module); module.load_digits(); "
          "print('sklearn' in sys.modules)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                       capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert out.stdout.strip().splitlines()[-1] == "False"
