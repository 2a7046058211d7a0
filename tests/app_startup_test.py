"""apps/app_startup: Keras loads without scikit-learn, which stays usable."""

import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, check=True,
                       capture_output=True, text=True, env=env)
  return out.stdout.strip().splitlines()[-1]


def test_keras_loads_without_scikit_learn_which_stays_importable():
  code = ("import os, sys; from apps import app_startup; "
          "loaded = 'sklearn' in sys.modules; "
          "from sklearn import datasets; "
          "print(loaded, 'keras' in sys.modules, "
          "datasets.load_digits().images.shape, "
          "os.environ['TF_CPP_MIN_LOG_LEVEL'])")
  assert _run(code) == "False True (1797, 8, 8) 3"


def test_a_process_that_loaded_keras_first_is_left_alone():
  code = ("import sys, keras; had = 'sklearn' in sys.modules; "
          "from apps import app_startup; "
          "print(had, sys.modules.get('sklearn') is not None)")
  assert _run(code) == "True True"
