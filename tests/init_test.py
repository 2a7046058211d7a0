"""`import keras_mas`: the modules the README lists, lazily; loading saved files."""

import os
import subprocess
import sys
import textwrap

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_readme_modules_are_attributes_and_load_on_first_use():
  result = _run("""
      import sys
      import keras_mas
      assert "keras_mas.training" not in sys.modules  # Lazy.
      assert callable(keras_mas.training.run_sequence)
      assert callable(keras_mas.metrics.summarize)
      assert callable(keras_mas.tasks.make_sequence)
      import os, pkgutil
      names = [m.name for m in pkgutil.iter_modules(keras_mas.__path__)
               if not m.name.startswith("_")]
      assert {"tasks", "metrics", "training", "importance"} <= set(names)
      for name in names:
        assert getattr(keras_mas, name).__name__ == "keras_mas." + name
        assert name in dir(keras_mas)
      try:
        keras_mas.no_such_module
      except AttributeError as e:
        assert "no_such_module" in str(e)
      else:
        raise AssertionError("no AttributeError")
      print("ok")
  """)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_loading_needs_import_keras_mas_as_documented(tmp_path):
  path = str(tmp_path / "m.keras")
  saved = _run(f"""
      import keras, keras_mas
      inputs = keras.Input((3,))
      keras_mas.MASModel(inputs, keras.layers.Dense(2)(inputs)).save({path!r})
      model = keras.models.load_model({path!r})
      assert isinstance(model, keras_mas.MASModel), type(model)
  """)
  assert saved.returncode == 0, saved.stderr[-3000:]
  without = _run(f"""
      import keras
      keras.models.load_model({path!r})
  """)
  assert without.returncode != 0
  assert "Could not locate class 'FunctionalMASModel'" in without.stderr


def test_import_keras_mas_registers_every_class_a_checkpoint_holds(tmp_path):
  # A keras.applications run's checkpoint holds ApplicationPreprocessing and
  # the task heads' losses: `import keras_mas` alone must find them.
  path = str(tmp_path / "app.keras")
  saved = _run(f"""
      import keras
      from keras_mas import architectures, heads
      net = architectures.build("mobilenetv3small", (8, 8, 1), 4)
      net.compile("adam", heads.TaskLoss(0, 2), metrics=[heads.TaskAccuracy(0, 2)])
      net.save({path!r})
  """)
  assert saved.returncode == 0, saved.stderr[-3000:]
  loaded = _run(f"""
      import sys, keras, keras_mas
      assert "keras_mas.architectures" in sys.modules
      model = keras.models.load_model({path!r})
      assert any(type(l).__name__ == "ApplicationPreprocessing"
                 for l in model.layers), [l.name for l in model.layers]
  """)
  assert loaded.returncode == 0, loaded.stderr[-3000:]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
