"""Every ```python block of README.md runs as written, in a fresh process."""

import os
import re
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_README = os.path.join(_ROOT, "README.md")


def _python_blocks():
  with open(_README, encoding="utf-8") as f:
    text = f.read()
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


_BLOCKS = _python_blocks()


def test_the_readme_has_its_examples():
  # A changed fence would otherwise leave nothing to run, silently.
  assert len(_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_block_runs_as_written(index, tmp_path):
  # Its own working directory: blocks save files where they run.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", _BLOCKS[index]],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, (
      f"README block {index} failed:\n{_BLOCKS[index]}\n"
      f"{result.stderr[-4000:]}")


@pytest.mark.parametrize("app", ["sequential_finetune", "task_free",
                                 "compare"])
def test_every_flag_of_an_app_is_in_the_readme(app):
  # The README's flag lists drift unless something checks them.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  path = os.path.join(_ROOT, "apps", f"{app}.py")
  result = subprocess.run([sys.executable, path, "--helpfull"], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  section = result.stdout.split(f"{app}.py:", 1)[1]
  names = []
  for line in section.splitlines()[1:]:
    if line and not line.startswith(" "):
      break  # The next module's flags.
    found = re.match(r"^  --(?:\[no\])?(\w+)", line)
    if found:
      names.append(found.group(1))
  assert len(names) > 5, result.stdout[:2000]
  with open(_README, encoding="utf-8") as f:
    readme = f.read()
  missing = [n for n in names if f"`--{n}" not in readme]
  assert not missing, f"apps/{app}.py flags not in README.md: {missing}"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
