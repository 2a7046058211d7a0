"""MAS under Keras's ModelParallel on JAX, on 8 CPU devices.

Each run is a subprocess (tests/model_parallel_helper.py): JAX fixes the
device count and Keras the backend at import. Against the single-device
run of the same model: Ω after `consolidate`, the weights after two steps
of `fit`, each Ω's and θ*'s layout against its variable's, the `.keras`
round trip under the same distribution, and with LoRA. Skipped where JAX
is not installed (`pip install -e .[jax]`).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import app_runner
import language_models
import tolerances

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="JAX not installed: pip install -e .[jax]")
_MESHES = ("8x1", "2x4", "1x8")
# Sharded sums run in another order than one device's: float32 round-off,
# amplified by Adam's first steps (its update is ~lr·sign(g) where g ≈ 0).
_OMEGA_RTOL = 1e-5
_WEIGHTS_RTOL = 1e-4


def _jax(*args, timeout=900):
  env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, *args], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _report(kind, loras, tmp_path, meshes=_MESHES):
  result = _jax(os.path.join(_HERE, "model_parallel_helper.py"), kind,
                str(tmp_path), loras, ",".join(meshes))
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _check(report, key):
  run = report[key]
  assert run["omega"] <= _OMEGA_RTOL, run
  assert run["weights"] <= _WEIGHTS_RTOL, run
  assert run["differing_layouts"] == [], run
  assert run["loaded_differing_layouts"] == [], run
  tolerances.assert_close(run["loaded_state"], 0.0)


# Data and model axes both above 1 in CI; each axis alone in the slow run.
@pytest.mark.parametrize("meshes", [
    ("2x4",), pytest.param(("8x1", "1x8"), marks=pytest.mark.slow)])
def test_a_causal_lm_on_each_mesh_matches_one_device(meshes, tmp_path):
  report = _report("causal_lm", "0", tmp_path, meshes)
  for mesh in meshes:
    _check(report, mesh)
    # Gemma's layout map shards every kernel: so are their Ω and θ*, and
    # each device holds as many bytes of MAS state as of Adam's.
    assert report[mesh]["sharded_state"] >= report[mesh]["state"] // 2
    assert report[mesh]["bytes"]["mas"] <= report[mesh]["bytes"]["optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("kind,loras", [("causal_lm", "1"),
                                        ("classifier", "0,1")])
def test_lora_and_a_text_classifier_match_one_device(kind, loras, tmp_path):
  report = _report(kind, loras, tmp_path)
  for key in report:
    _check(report, key)


def test_a_mesh_or_layout_map_that_does_not_fit_is_named():
  # One JAX process for every case: each prints its error's first line.
  code = (
      "import keras, keras_mas\n"
      "from keras_mas.core import model_parallel\n"
      "def named(make):\n"
      "  try:\n"
      "    make()\n"
      "  except ValueError as e:\n"
      "    print(str(e).splitlines()[0])\n"
      "for bad in [(3, 2), (8,), (2, 4, 1)]:\n"
      "  named(lambda: model_parallel.make_distribution(bad))\n"
      "distribution = model_parallel.make_distribution((2, 4))\n"
      "layout = keras.distribution.LayoutMap(distribution.device_mesh)\n"
      "layout['decoder_block.*kernel'] = (None, 'model')\n"
      "model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])\n"
      "named(lambda: model_parallel.check_layout_map(layout, model))\n")
  result = _jax("-c", code, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 4, result.stdout
  assert all(l.startswith("Invalid value for argument `mesh`")
             for l in lines[:3])
  assert "the number of devices, 8" in lines[0]
  assert lines[3].startswith("Invalid value for argument `layout_map`")
  assert "decoder_block.*kernel" in lines[3]


def test_model_parallel_on_tensorflow_is_refused_by_name():
  from keras_mas.core import model_parallel  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() == "jax":
    pytest.skip("runs on a backend other than JAX")
  with pytest.raises(ValueError, match="argument `mesh`.*KERAS_BACKEND=jax"):
    model_parallel.make_distribution((1, 1))


_EIGHT = "--xla_force_host_platform_device_count=8"
_TINY = ("--num_tasks=2", "--epochs=1", "--hidden_units=16", "--verbose=0")


def test_the_app_trains_a_classifier_on_a_mesh(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", _EIGHT)
  result = app_runner.run_finetune(tmp_path / "run", "--mesh=2,4",
                                   "--num_tasks=2", "--epochs=3",
                                   "--verbose=0", backend="jax")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "run" / "results.json") as f:
    results = json.load(f)
  assert results["extra"]["flags"]["mesh"] == ["2", "4"]
  assert results["acc"] > 0.5, results["accuracy_matrix"]


_BAD_FLAGS = {
    "size": (["--mesh=3,2"], "argument `mesh`", "jax"),
    "backend": (["--mesh=1,1"], "argument `mesh`", "tensorflow"),
    "batch": (["--mesh=2,4", "--batch_size=5"], "argument `batch_size`",
              "jax"),
    "both": (["--mesh=1,8", "--distribution=mirrored"], "argument `mesh`",
             "jax"),
}


@pytest.mark.parametrize("case", [
    "size", "backend",
    pytest.param("batch", marks=pytest.mark.slow),
    pytest.param("both", marks=pytest.mark.slow)])
def test_bad_mesh_flags_are_named_before_training(case, tmp_path,
                                                   monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", _EIGHT)
  flags, named, backend = _BAD_FLAGS[case]
  result = app_runner.run_finetune(tmp_path / "run", *flags, *_TINY,
                                   timeout=300, backend=backend)
  assert result.returncode == 1, (flags, result.stderr[-3000:])
  last = result.stderr.strip().splitlines()[-1]
  assert named in last, (flags, last)
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_causal_lm_split_over_eight_devices_gives_one_devices_table(
    tmp_path, monkeypatch):
  preset = language_models.save_preset("gpt2", tmp_path / "gpt2")
  corpus = language_models.write_corpus(
      tmp_path / "changelogs", language_models.changelog_text(3000))
  monkeypatch.setenv("XLA_FLAGS", _EIGHT)
  tables = []
  for mesh in ([], ["--mesh=1,8"]):
    workdir = tmp_path / f"run{len(tables)}"
    result = app_runner.run_finetune(
        workdir, f"--init_model={preset}", f"--task_dirs={corpus}",
        "--epochs=2", "--learning_rate=0.01", "--generate_length=4",
        "--verbose=0", *mesh, backend="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "results.json") as f:
      tables.append(json.load(f)["loss_matrix"])
  tolerances.assert_all_close(tables[1], tables[0], rtol=1e-4)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_consolidate_as_one(tmp_path):
  script = os.path.join(_HERE, "model_parallel_processes.py")
  one = _jax(script, str(tmp_path / "one.npz"))
  assert one.returncode == 0, one.stderr[-3000:]
  env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  port = str(_free_port())
  processes = [subprocess.Popen(
      [sys.executable, script, str(tmp_path / "two.npz"), str(i), "2", port],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in (0, 1)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
    assert "done" in out
  import numpy as np  # pylint: disable=g-import-not-at-top
  single, shared = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(single.files) == sorted(shared.files)
  for prefix, rtol in (("omega", _OMEGA_RTOL), ("weight", _WEIGHTS_RTOL)):
    names = [n for n in single.files if n.startswith(prefix)]
    scale = max(float(np.abs(single[n]).max()) for n in names)
    for n in names:
      # As the helper measures: relative to the tensor's scale, at least a
      # thousandth of the largest's (a key bias's Ω is round-off).
      floor = max(float(np.abs(single[n]).max()), 1e-3 * scale)
      assert float(np.abs(shared[n] - single[n]).max()) <= rtol * floor, n


def test_the_rule_splits_kernels_on_the_model_axis():
  from keras_mas.core import model_parallel  # pylint: disable=g-import-not-at-top
  assert model_parallel.rule_axes((64, 128), 4) == (None, "model")
  assert model_parallel.rule_axes((64, 6), 4) == ("model", None)
  assert model_parallel.rule_axes((6, 6), 4) == (None, None)
  assert model_parallel.rule_axes((128,), 4) == (None,)
  assert model_parallel.rule_axes((64, 128), 1) == (None, None)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
