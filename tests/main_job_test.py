"""The README's main job at full size: MAS forgets clearly less (slow).

Run with `.venv/bin/python -m pytest -m slow`; CI skips it.
"""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *flags):
  done = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "apps", "sequential_finetune.py"),
       f"--workdir={workdir}", "--verbose=0", *flags],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True,
      text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_default_main_job_mas_forgets_far_less_than_fine_tuning(tmp_path):
  mas = _run(str(tmp_path / "mas"))
  finetune = _run(str(tmp_path / "finetune"), "--method=finetune")
  assert finetune["forgetting"] > 0.4  # the default sequence does forget
  assert mas["forgetting"] < 0.6 * finetune["forgetting"]
  assert mas["acc"] > finetune["acc"] + 0.1


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q", "-m", "slow"]))
