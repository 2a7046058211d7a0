"""How close two float results must be in the tests, stated once.

The same float32 computation gives other last bits on another machine: a CPU
with another vector width, TensorFlow's oneDNN kernels on or off
(`TF_ENABLE_ONEDNN_OPTS`), a GPU, all change the order in which sums are
taken. A sum of n float32 terms then moves by up to about n·ε of the sum of
the terms' magnitudes (ε = 1.2e-7): relative to a result that cancels, that
is any amount. So a comparison has two parts, as Keras's own
`TestCase.assertAllClose` does (`rtol = atol = 1e-6`, for values of order
one): a relative tolerance per element, and an absolute one, here taken
relative to the largest magnitude of the expected array, so that an array of
small values (importance can be 1e-9) is not compared vacuously.

Use `assert_close` for any float32 result computed by TensorFlow, JAX or
PyTorch and compared to values made elsewhere (a NumPy reference, a file
saved on another machine, another backend, another kernel). Exact equality
(`np.testing.assert_array_equal`) is only for values identical by
construction: numbers copied, stored and read back, or the same operations
replayed in the same process order on the same machine (a resume).
"""

import numpy as np

# About 80 ε: a few reorderings of sums over hundreds of terms.
RTOL = 1e-5
# Of the expected array's largest magnitude: Keras's atol for values of
# order one, scaled with the values.
ATOL_OF_SCALE = 1e-6


def assert_close(actual, desired, rtol=RTOL, atol=None, err_msg=""):
  """`np.testing.assert_allclose` with the tolerances above.

  Args:
    actual: the value under test (array-like, scalar or tensor).
    desired: the expected value.
    rtol: relative tolerance per element; looser where a test compares two
      methods that are equal in exact arithmetic but sum very differently
      (say so where it is set).
    atol: absolute tolerance; by default `ATOL_OF_SCALE` times the largest
      magnitude in `desired`.
    err_msg: printed on failure.
  """
  actual = np.asarray(actual, dtype="float64")
  desired = np.asarray(desired, dtype="float64")
  if atol is None:
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    atol = ATOL_OF_SCALE * scale
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol,
                             err_msg=err_msg)


def assert_all_close(actual, desired, **kwargs):
  """`assert_close` for each pair of two equally long lists of arrays."""
  actual, desired = list(actual), list(desired)
  assert len(actual) == len(desired), (len(actual), len(desired))
  for i, (a, d) in enumerate(zip(actual, desired)):
    assert_close(a, d, err_msg=f"entry {i}", **kwargs)
