"""Transformers, modern CNNs, recurrent nets and KerasHub under MAS.

Each model runs in its own process (`model_zoo.py`): a crash there fails
the test, it does not end pytest.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "model_zoo.py")
_EXPECTED_UNITS = {
    "transformer": {"DenseUnit", "EinsumDenseUnit", "EmbeddingUnit",
                    "NormalizationUnit"},
    "mobilenet": {"ConvUnit", "DenseUnit", "DepthwiseConvUnit",
                  "NormalizationUnit"},
    "recurrent": {"DenseUnit", "Fallback"},
    "text_cnn": {"ConvUnit", "DenseUnit", "EmbeddingUnit"},
    # Its token and position embeddings are KerasHub layers of their own
    # (ReversibleEmbedding, PositionEmbedding), in closed form too.
    "keras_hub_bert": {"DenseUnit", "EinsumDenseUnit", "EmbeddingUnit",
                       "NormalizationUnit", "PositionEmbeddingUnit",
                       "ReversibleEmbeddingUnit"},
}


def _run(name, *flags):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run([sys.executable, _SCRIPT, name, *flags],
                        capture_output=True, text=True, timeout=600, env=env,
                        check=False)
  assert done.returncode == 0, (
      f"{name} exited with {done.returncode} (negative: killed by signal "
      f"{-done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _check(findings):
  assert findings["importance_finite"] and findings["importance_nonnegative"]
  assert findings["measured_fraction"] > 0.9, findings
  assert findings["loss_finite"]
  # Mixed precision may skip the first steps (loss scale too high): the
  # last epoch has moved away from the anchors.
  assert findings["penalty"][-1] > 0, findings["penalty"]
  assert all(findings.get(f"{m}_finite", True) for m in ("local_mas",
                                                         "fisher"))


# The two largest, a minute each: slow (per_sample_test checks their layers'
# closed forms against the per-sample reference in the fast suite).
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("mobilenet", "recurrent")
    else n for n in sorted(_EXPECTED_UNITS)])
def test_two_tasks_with_exact_importance(name):
  if name == "keras_hub_bert":
    pytest.importorskip("keras_hub")
  findings = _run(name)
  assert set(findings["units"]) == _EXPECTED_UNITS[name]
  assert findings["relative_error"] < 1e-4, findings
  _check(findings)


def test_transformer_in_mixed_precision():
  _check(_run("transformer", "--mixed_precision"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
