"""The package as users install it: a wheel, its console scripts, `-m`.

Builds the wheel, installs it into a fresh virtual environment outside the
repository and runs the apps from a folder outside it too. Offline: the
wheel goes in without its dependencies, which the fresh environment reads
from this one's site-packages (a path file, so none of this environment's
own path files, the editable install of the clone among them, apply).
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPTS = ("keras-mas-finetune", "keras-mas-compare", "keras-mas-task-free")


def _run(args, cwd, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600, check=False, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  root = tmp_path_factory.mktemp("install")
  built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                "--no-build-isolation", "-q", "-w", str(root / "dist"),
                _ROOT], cwd=root)
  assert built.returncode == 0, built.stderr[-3000:]
  (wheel,) = (root / "dist").glob("keras_mas-*.whl")
  venv = root / "venv"
  made = _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
  assert made.returncode == 0, made.stderr
  python = venv / "bin" / "python"
  site = _run([str(python), "-c", "import sysconfig; "
               "print(sysconfig.get_paths()['purelib'])"], cwd=root)
  with open(os.path.join(site.stdout.strip(), "dependencies.pth"), "w",
            encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  added = _run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                "--no-index", str(wheel)], cwd=root)
  assert added.returncode == 0, added.stderr[-3000:]
  outside = root / "elsewhere"
  outside.mkdir()
  return {"wheel": wheel, "venv": venv, "python": python, "cwd": outside}


def test_the_wheel_holds_the_library_and_the_apps(installed):
  names = zipfile.ZipFile(installed["wheel"]).namelist()
  assert "keras_mas/core/models.py" in names
  assert {"keras_mas_apps/sequential_finetune.py", "keras_mas_apps/compare.py",
          "keras_mas_apps/task_free.py",
          "keras_mas_apps/app_startup.py"} <= set(names)
  assert not any(n.startswith(("apps/", "tests/")) for n in names)
  (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
  text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
  assert all(script in text for script in _SCRIPTS)


def test_the_main_job_runs_by_its_console_script(installed):
  workdir = installed["cwd"] / "run"
  result = _run([str(installed["venv"] / "bin" / "keras-mas-finetune"),
                 f"--workdir={workdir}", "--num_tasks=2", "--epochs=1",
                 "--verbose=0"], cwd=installed["cwd"])
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert len(results["accuracy_matrix"]) == 2
  assert results["extra"]["flags"]["num_tasks"] == 2  # The flags, recorded.


def test_the_library_comes_from_the_install_not_the_clone(installed):
  result = _run([str(installed["python"]), "-c",
                 "import keras_mas, keras_mas_apps; "
                 "print(keras_mas.__file__); print(keras_mas_apps.__file__)"],
                cwd=installed["cwd"])
  assert result.returncode == 0, result.stderr[-3000:]
  for path in result.stdout.split():
    assert path.startswith(str(installed["venv"])), path


@pytest.mark.parametrize("app", ["sequential_finetune", "compare",
                                 "task_free"])
def test_each_app_runs_with_python_m(installed, app):
  result = _run([str(installed["python"]), "-m", f"keras_mas_apps.{app}",
                 "--helpshort"], cwd=installed["cwd"])
  # absl prints the app's own flags, then exits with status 1.
  assert "--workdir: Output directory." in result.stdout, result.stderr[-3000:]
