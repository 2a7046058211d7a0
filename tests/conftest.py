"""Test settings: quiet TensorFlow, the repository importable."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TESTS))
sys.path.insert(0, _TESTS)


def pytest_report_header(config):
  """Says which of TensorFlow's CPU paths this run takes.

  The same float32 tests see other kernels with oneDNN on or off, and some
  (channels-first convolutions) run only with it: a log that says which
  tells a failure on another machine from one here.
  """
  del config  # unused
  # pylint: disable-next=g-import-not-at-top
  import capabilities
  setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TensorFlow's "
                           "default for this CPU)")
  error = capabilities.channels_first_conv_error()
  return [f"TF_ENABLE_ONEDNN_OPTS: {setting}; channels-first convolution on "
          f"the CPU: {'runs' if error is None else 'unavailable (' + error + ')'}"]
