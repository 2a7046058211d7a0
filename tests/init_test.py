"""`import keras_mas`: the modules it documents, lazily; loading saved files."""

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
      assert "keras_mas.experiments.sequential" not in sys.modules  # Lazy.
      assert callable(keras_mas.experiments.sequential.run_sequence)
      assert callable(keras_mas.importance.mas)
      assert callable(keras_mas.data.tasks.make_sequence)
      assert callable(keras_mas.task_free.fit_stream)
      import pkgutil
      names = [m.name for m in pkgutil.iter_modules(keras_mas.__path__)
               if not m.name.startswith("_")]
      assert set(names) == {"core", "data", "experiments", "importance",
                            "task_free"}, names
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


def test_the_0_1_module_names_are_the_moved_modules():
  result = _run("""
      import importlib
      import keras_mas
      from keras_mas import _aliases
      for old, new in _aliases.MOVED.items():
        moved = importlib.import_module("keras_mas." + new)
        assert getattr(keras_mas, old) is moved, old
        assert importlib.import_module("keras_mas." + old) is moved, old
        assert moved.__spec__.name == "keras_mas." + new, moved.__spec__
      import keras_mas.training
      from keras_mas import tasks, models
      assert keras_mas.training.run_sequence is (
          keras_mas.experiments.sequential.run_sequence)
      assert models.MASModel is keras_mas.MASModel
      assert tasks.make_sequence is keras_mas.data.tasks.make_sequence
      assert keras_mas.task_free.run_stream is (
          keras_mas.experiments.streaming.run_stream)
      print("ok")
  """)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_files_saved_by_keras_mas_0_1_load(tmp_path):
  # Saved before the subpackages (tests/data, written by 0.1.0's layout):
  # a MASModel with Ω, θ*, λ and compiled task heads; a plain model with a
  # MASRegularizer attached.
  # The values were computed on the machine that saved them: compared with
  # the shared tolerances (tests/tolerances.py), not to the last bit.
  data = os.path.join(_ROOT, "tests", "data")
  result = _run(f"""
      import sys
      sys.path.insert(0, {os.path.join(_ROOT, "tests")!r})
      import numpy as np, keras, keras_mas, tolerances
      saved = np.load({os.path.join(data, "saved_0.1.0.npz")!r})
      model = keras.models.load_model(
          {os.path.join(data, "mas_model_0.1.0.keras")!r})
      assert isinstance(model, keras_mas.MASModel)
      assert model.strength == 0.5 and model.consolidated_tasks == 1
      tolerances.assert_close(float(model.mas_penalty()), saved["penalty"])
      tolerances.assert_close(np.array(model(saved["x"])), saved["outputs"])
      plain = keras.models.load_model(
          {os.path.join(data, "regularized_0.1.0.keras")!r})
      tolerances.assert_close(float(sum(plain.losses)),
                              saved["plain_penalty"])
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
      assert "keras_mas.experiments.architectures" in sys.modules
      model = keras.models.load_model({path!r})
      assert any(type(l).__name__ == "ApplicationPreprocessing"
                 for l in model.layers), [l.name for l in model.layers]
  """)
  assert loaded.returncode == 0, loaded.stderr[-3000:]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
