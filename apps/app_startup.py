"""What every app does first, before TensorFlow and Keras are loaded.

Imported for its effect, before any other import of the app's:

* TensorFlow 2.21 logs harmless C++ errors on every run (no CUDA device; an
  attribute tf.data's graphs mention that its kernels do not know): fatal
  ones only, unless the user asks for more (`TF_CPP_MIN_LOG_LEVEL`).
* Keras imports scikit-learn, when it is installed, for its scikit-learn
  wrappers (`keras.wrappers`), which no app uses: over a second of start-up
  (SciPy and more), a tenth of the default main job. Keras is imported
  here with scikit-learn hidden (Keras then leaves its wrappers out, as
  where scikit-learn is absent); scikit-learn stays importable afterwards
  (`keras_mas.data.digits` reads the digits without it). A library must not do
  this to its users' process; an app owns its process.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_keras_without_sklearn():
  if "keras" in sys.modules or "sklearn" in sys.modules:
    return
  sys.modules["sklearn"] = None  # `import sklearn` raises ImportError.
  try:
    import keras  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    if sys.modules.get("sklearn", 0) is None:
      del sys.modules["sklearn"]


_import_keras_without_sklearn()
