"""The apps' entry point: bad input is one line on stderr, exit status 1.

Flags are the apps' own (the library reads none); this only turns a
`ValueError` (or `OSError`, `RuntimeError`) raised for the user's input into
the line a person reads, instead of a Python traceback.
"""

import sys

__all__ = ["fail", "main_with_one_line_errors"]


def main_with_one_line_errors(body):
  """An `absl.app.run` main that calls `body()` and reports bad input.

  Example:

  ```python
  def _main():
    training.run_sequence(...)

  main = cli.main_with_one_line_errors(_main)

  if __name__ == "__main__":
    app.run(main)
  ```

  Args:
    body: a function of no arguments doing the app's work.

  Returns:
    A function of `argv` for `absl.app.run`.
  """

  def main(argv):
    if len(argv) > 1:
      fail(f"Unexpected arguments {argv[1:]}; every setting is a --flag.")
    try:
      body()
    except (ValueError, OSError, RuntimeError) as e:
      # Bad input is the user's to fix: one line, no traceback.
      fail(f"{type(e).__name__}: {e}")

  return main


def fail(message):
  """Prints `error: <message>` on one line to stderr and exits with 1."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(1)
