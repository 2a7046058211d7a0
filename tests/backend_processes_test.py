"""The kept worker starts each script as a new process would."""

import backend_processes
import pytest

_PATCH = """
import json
import keras
from keras_mas.importance import _closed_forms
keras.config.set_floatx("float16")
keras.config.set_dtype_policy("mixed_float16")
_closed_forms.CLOSED_FORM_UNITS = ()
_closed_forms.added_by_a_script = 1
print(json.dumps(len(_closed_forms.CLOSED_FORM_UNITS)))
"""

_READ = """
import json
import keras
from keras_mas.importance import _closed_forms
print(json.dumps([keras.config.floatx(), keras.config.dtype_policy().name,
                  len(_closed_forms.CLOSED_FORM_UNITS)]))
"""


def test_settings_and_patched_globals_are_restored_between_scripts():
  assert backend_processes.run(_PATCH, "tensorflow") == 0
  floatx, policy, units = backend_processes.run(_READ, "tensorflow")
  assert (floatx, policy) == ("float32", "float32") and units > 0


def test_a_failing_script_is_reported_and_the_worker_goes_on():
  with pytest.raises(AssertionError, match="ZeroDivisionError"):
    backend_processes.run("1 / 0", "tensorflow")
  assert backend_processes.run("print(7)", "tensorflow") == 7


def test_a_script_that_kills_its_worker_fails_and_the_next_gets_a_new_one():
  with pytest.raises(AssertionError, match="worker died"):
    backend_processes.run("import os; os._exit(3)", "tensorflow")
  assert backend_processes.run("print(8)", "tensorflow") == 8
