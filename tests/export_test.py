"""SavedModel export: loads in a fresh process without keras_mas, same outputs."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from keras_mas import export
from keras_mas import tasks
from keras_mas import training
import tolerances

_SERVE = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    served = tf.saved_model.load(sys.argv[1])
    data = np.load(sys.argv[2])
    out = {name: fn(image=tf.constant(data["x"]))["output_0"].numpy()
           for name, fn in served.signatures.items()}
    assert "keras_mas" not in sys.modules
    np.savez(sys.argv[3], **out)
""")


def _serve_in_fresh_process(path, x, tmp_path):
  np.savez(tmp_path / "in.npz", x=x)
  env = dict(os.environ, PYTHONPATH="")
  subprocess.run(
      [sys.executable, "-c", _SERVE, path, str(tmp_path / "in.npz"),
       str(tmp_path / "out.npz")],
      check=True, cwd=str(tmp_path), env=env, capture_output=True)
  return dict(np.load(tmp_path / "out.npz"))


def test_task_incremental_export_serves_every_head(tmp_path):
  sequence = tasks.make_sequence("digits", "split", "task", 3)
  for task in sequence.tasks:
    task.x_train, task.y_train = task.x_train[:48], task.y_train[:48]
    task.x_test, task.y_test = task.x_test[:16], task.y_test[:16]
  workdir = str(tmp_path / "run")
  training.run_sequence(sequence, workdir, epochs=1, hidden_units=16,
                        verbose=0)
  model = keras.models.load_model(
      os.path.join(workdir, "checkpoints", "task_1", "model.keras"))
  x = sequence.tasks[0].x_test
  expected = model.predict(x, verbose=0)
  served = _serve_in_fresh_process(
      os.path.join(workdir, "export", "task_1"), x, tmp_path)
  assert set(served) == {"serve", "serving_default", "task_0", "task_1",
                         "seen"}
  tolerances.assert_close(served["serve"], expected)
  for k in (0, 1):
    start, stop = sequence.tasks[k].output_slice
    tolerances.assert_close(served[f"task_{k}"], expected[:, start:stop])
  tolerances.assert_close(served["seen"], expected[:, :6])


def test_export_replaces_an_old_export_whole(tmp_path):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  path = str(tmp_path / "export")
  export.export_serving(model, path, (3,))
  model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
  export.export_serving(model, path, (3,))
  x = np.ones((2, 3), "float32")
  served = _serve_in_fresh_process(path, x, tmp_path)
  tolerances.assert_close(served["serve"], model.predict(x, verbose=0))
  assert os.listdir(tmp_path).count("export") == 1
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_a_kept_exporter_writes_the_current_weights_and_heads(tmp_path):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
  exporter = export.ServingExport(model, (3,))
  exporter.write(str(tmp_path / "first"))
  traced = exporter._archive  # pylint: disable=protected-access
  model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
  exporter.write(str(tmp_path / "second"))
  assert exporter._archive is traced  # pylint: disable=protected-access
  exporter.write(str(tmp_path / "heads"), heads={"task_0": (0, 2)})
  x = np.ones((2, 3), "float32")
  expected = model.predict(x, verbose=0)
  second = _serve_in_fresh_process(str(tmp_path / "second"), x, tmp_path)
  tolerances.assert_close(second["serve"], expected)
  heads = _serve_in_fresh_process(str(tmp_path / "heads"), x, tmp_path)
  assert set(heads) == {"serve", "serving_default", "task_0"}
  tolerances.assert_close(heads["task_0"], expected[:, :2])
  first = _serve_in_fresh_process(str(tmp_path / "first"), x, tmp_path)
  assert not np.allclose(first["serve"], expected)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
