"""The app through its flags: a run, resume, and errors before training."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APP = os.path.join(_ROOT, "apps", "sequential_finetune.py")
_FAST = ["--num_tasks=2", "--epochs=1", "--hidden_units=16", "--verbose=0",
         "--recipe=split"]


def _run(*flags, **env_vars):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_vars)
  return subprocess.run([sys.executable, _APP, *flags], capture_output=True,
                        text=True, env=env, timeout=300)


def test_app_runs_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", "--method=mas", "--strength=0.5",
              *_FAST)
  assert done.returncode == 0, done.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["method"] == "mas" and results["scenario"] == "domain"
  assert results["config"]["strength"] == 0.5
  assert results["extra"]["flags"]["strength"] == 0.5
  again = _run(f"--workdir={workdir}", "--method=mas", "--strength=0.5",
               "--resume", *_FAST, "--verbose=1")
  assert again.returncode == 0, again.stderr
  assert "is complete: all 2 tasks were trained" in again.stdout
  assert "ACC" in again.stdout  # Its table.
  # The same command again, without --resume: refused in the flags' words.
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  refused = _run(f"--workdir={workdir}", "--method=mas", "--strength=0.5",
                 *_FAST)
  assert refused.returncode == 1
  lines = [l for l in refused.stderr.splitlines() if "--resume" in l]
  assert len(lines) == 1 and "finished run" in lines[0], refused.stderr
  assert "new --workdir" in lines[0]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == saved  # Nothing already saved changed.


def test_app_learns_task_free_on_a_stream(tmp_path):
  workdir = str(tmp_path / "stream")
  done = _run(f"--workdir={workdir}", "--task_boundaries=none", "--strength=1",
              "--num_tasks=2", "--recipe=split", "--export_consolidations",
              "--verbose=0")
  assert done.returncode == 0, done.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["method"] == "mas"
  assert len(results["accuracy_matrix"]) == 2
  assert results["consolidations"] and 0 < results["online_accuracy"] <= 1
  assert sorted(os.listdir(os.path.join(workdir, "export_consolidations"))) == (
      sorted(f"step_{s}" for s in results["consolidations"]))
  assert os.path.isfile(os.path.join(workdir, "online_accuracy.png"))
  wrong = _run(f"--workdir={tmp_path / 'ewc'}", "--task_boundaries=none",
               "--method=ewc", *_FAST)
  assert wrong.returncode == 1 and "argument `method`" in wrong.stderr


@pytest.fixture(scope="module")
def task_spec_records(tmp_path_factory):
  """`(spec, records)`: the example task spec and the TFRecords it reads."""
  records = str(tmp_path_factory.mktemp("records"))
  written = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "examples", "write_records.py"),
       records], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert written.returncode == 0, written.stderr
  return os.path.join(_ROOT, "examples", "task_spec.py"), records


def test_app_streams_the_tfrecords_of_a_task_spec(task_spec_records,
                                                  tmp_path):
  spec, records = task_spec_records
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", f"--task_spec={spec}", "--method=lwf",
              "--scenario=task", "--epochs=2", "--hidden_units=16",
              "--verbose=0", KERAS_MAS_RECORDS=records)
  assert done.returncode == 0, done.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["tasks"] == ["a", "b"]
  assert results["dataset"] == f"spec:{spec}"
  assert results["accuracy_matrix"][0][0] > 0.5  # 5 classes: chance 0.2
  assert os.path.isdir(os.path.join(workdir, "export", "task_1"))


# Slow: task-free learning from pipelines is also task_free_test's (the
# library's stream of them) and test_app_learns_task_free_on_a_stream's
# (the app's), in CI.
@pytest.mark.slow
def test_app_learns_task_free_from_the_tfrecords_of_a_task_spec(
    task_spec_records, tmp_path):
  # The same records as one stream, task-free: read from the pipelines.
  spec, records = task_spec_records
  stream_dir = str(tmp_path / "stream")
  streamed = _run(f"--workdir={stream_dir}", f"--task_spec={spec}",
                  "--task_boundaries=none", "--export_consolidations",
                  "--verbose=0", KERAS_MAS_RECORDS=records)
  assert streamed.returncode == 0, streamed.stderr
  with open(os.path.join(stream_dir, "results.json")) as f:
    results = json.load(f)
  assert results["tasks"] == ["a", "b"] and len(results["boundaries"]) == 2
  assert results["consolidations"], results
  assert sorted(os.listdir(os.path.join(stream_dir,
                                        "export_consolidations"))) == sorted(
      f"step_{s}" for s in results["consolidations"])
  assert os.path.isfile(os.path.join(stream_dir, "online_accuracy.png"))


@pytest.mark.parametrize("flag, message", [
    ("--method=magic", "--method"),
    ("--scenario=online", "--scenario"),
    ("--recipe=blurred", "--recipe"),
    ("--num_tasks=0", "--num_tasks"),
    ("--epochs=0", "--epochs"),
    ("--importance_samples=0", "--importance_samples"),
    ("--dataset=no_such_dataset_xyz", "argument `dataset`"),
    ("--num_tasks=9", "argument `num_tasks`"),
    ("--strength=-1", "argument `strength`"),
    ("--strength=nan", "argument `strength`"),
    ("--learning_rate=-1", "argument `learning_rate`"),
    ("--learning_rate=0", "argument `learning_rate`"),
    ("--optimizer=nope", "argument `optimizer`"),
    ("--model=resnet9000", "argument `model`"),
    ("--weights=/no/such/file.h5", "argument `weights`"),
    ("--tfds_splits=train", "argument `splits`"),
    ("--dataset=idx:/no/such/dir", "argument `dataset`"),
    ("--method=replay", "argument `method`"),
    ("--task_boundaries=maybe", "--task_boundaries"),
])
def test_bad_flags_fail_before_training_in_one_line(tmp_path, flag,
                                                    message):
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", *_FAST, flag)
  assert done.returncode == 1
  assert "Traceback" not in done.stderr, done.stderr
  lines = [l for l in done.stderr.splitlines() if message in l]
  assert len(lines) == 1, done.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_app_trains_a_keras_applications_backbone(tmp_path):
  # Lower-case name, random weights, frozen: 8×8 grey digits are resized
  # and given three channels inside the model; the export takes them raw.
  workdir = str(tmp_path / "run")
  done = _run(f"--workdir={workdir}", *_FAST, "--model=mobilenetv3small",
              "--weights=none", "--freeze_backbone", "--batch_size=64",
              "--importance_samples=32")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["config"]["model"] == "mobilenetv3small"
  assert results["config"]["freeze_backbone"] is True
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  served = tf.saved_model.load(os.path.join(workdir, "export", "task_1"))
  logits = served.serve(tf.zeros((3, 8, 8, 1)))
  assert tuple(logits.shape) == (3, 5)  # Two tasks of five digits.
  assert np.all(np.isfinite(logits.numpy()))


def _image_folder(folder, seed, classes=("a", "b"), per_class=8):
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for k, c in enumerate(classes):
    os.makedirs(os.path.join(folder, c))
    for i in range(per_class):
      # Class k is brighter on its own half: learnable, not trivial.
      image = rng.integers(0, 128, (8, 8, 1))
      image[:, 4 * k:4 * k + 4] += 127
      keras.utils.save_img(os.path.join(folder, c, f"{i}.png"),
                           image.astype("uint8"), scale=False)


@pytest.fixture(name="deployed")
def _deployed(tmp_path):
  """A trained .keras model and image folders: old data and two tasks."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for i, name in enumerate(("old", "task_a", "task_b")):
    _image_folder(str(tmp_path / name), seed=i)
  _image_folder(str(tmp_path / "one_class"), seed=3, classes=("a",))
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(8, activation="relu"),
                            keras.layers.Dense(2)], name="deployed")
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
  model.fit(np.random.default_rng(0).random((16, 8, 8, 1)),
            np.arange(16) % 2, epochs=1, verbose=0)
  path = str(tmp_path / "deployed.keras")
  model.save(path)
  return tmp_path, path


def test_app_adapts_a_saved_model_on_image_folders(deployed):
  folder, model_path = deployed
  workdir = str(folder / "run")
  done = _run(f"--workdir={workdir}", f"--init_model={model_path}",
              f"--task_dirs={folder}/task_a,{folder}/task_b",
              f"--importance_data={folder}/old", "--scenario=domain",
              "--method=mas", "--epochs=1", "--batch_size=8", "--verbose=0")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["tasks"] == ["task_a", "task_b"]
  assert results["config"]["model"] == "custom:deployed"
  assert results["config"]["importance_data"] == {"samples": 16,
                                                  "labels": True}
  assert len(results["importance_data_accuracy"]) == 3
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  served = tf.saved_model.load(os.path.join(workdir, "export", "task_1"))
  assert tuple(served.serve(tf.zeros((3, 8, 8, 1))).shape) == (3, 2)


@pytest.mark.parametrize("method", ["mas", "finetune"])
def test_app_adapts_a_saved_model_to_one_new_folder(deployed, method):
  # The paper's setting: the model one has, plus one new dataset; and the
  # baseline it is compared with, plain fine-tuning, on the same report.
  folder, model_path = deployed
  workdir = str(folder / "run")
  done = _run(f"--workdir={workdir}", f"--init_model={model_path}",
              f"--task_dirs={folder}/task_b",
              f"--importance_data={folder}/old", "--scenario=domain",
              f"--method={method}", "--epochs=1", "--batch_size=8",
              "--verbose=1")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["tasks"] == ["task_b"]
  assert len(results["accuracy_matrix"]) == 1
  before, after = results["importance_data_accuracy"]
  assert (f"accuracy on the importance data: before {before:.3f}, "
          f"after task 0 {after:.3f}") in done.stdout
  # No Keras warning per task (it passed `shuffle` with a pipeline).
  assert "UserWarning" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("change, message", [
    ({"--task_dirs": "{folder}/one_class"}, "two or more class subfolders"),
    ({"--init_model": "{folder}/task_a/a/0.png"}, "argument `init_model`"),
    ({"--task_dirs": "{folder}/task_a,{folder}/absent"}, "no such folder"),
    ({"--image_size": "16,16"}, "argument `image_size`"),
    ({"--importance_data": "{folder}/absent"}, "argument `importance_data`"),
])
def test_app_bad_user_data_fails_before_training(deployed, change, message):
  folder, model_path = deployed
  flags = {"--workdir": "{folder}/run", "--init_model": model_path,
           "--task_dirs": "{folder}/task_a,{folder}/task_b",
           "--importance_data": "{folder}/old", "--scenario": "domain",
           "--epochs": "1", "--verbose": "0", **change}
  done = _run(*(f"{k}={v.format(folder=folder)}" for k, v in flags.items()))
  assert done.returncode == 1
  assert "Traceback" not in done.stderr, done.stderr
  assert len([l for l in done.stderr.splitlines() if message in l]) == 1
  assert not os.path.exists(str(folder / "run"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
