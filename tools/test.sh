#!/usr/bin/env bash
# Sets up the project's virtual environment and runs the fast test suite:
# pytest (everything not marked slow), then `bazel build //...` and the small
# Bazel test targets, then the documentation site's strict build. The
# README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed=""
[ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"

[ -x .venv/bin/python ] || python3 -m venv .venv
# `jax`, `torch`: tests/backends_test.py runs the library on Keras's JAX and
# PyTorch backends; `docs`: the documentation site's generator. PyTorch's
# CPU build first: `torch` alone would bring a CUDA build of several GB (this
# machine's pip finds 2.13.0's CPU wheel).
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0 \
  || echo "torch 2.13.0 (CPU) not installable here: PyTorch's tests skip"
if .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" -e ".[test,jax,torch,docs]"
else
  "${pip[@]}" -e ".[test,jax,docs]"
fi

# Fashion-MNIST offline (Debian's IDX files, 30 MB) for the real-data tests;
# where it cannot be installed those tests skip and say why.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  { $sudo_if_needed apt-get update -qq \
      && $sudo_if_needed apt-get install -y -qq dataset-fashion-mnist; } \
    >/dev/null 2>&1 \
    || echo "dataset-fashion-mnist not installed: Fashion-MNIST tests skip"
fi

export TF_CPP_MIN_LOG_LEVEL=2
log=$(mktemp)
site=$(mktemp -d)  # The documentation site's build, outside the clone.
trap 'rm -rf "$log" "$site"' EXIT
.venv/bin/python -m pytest -m "not slow" -n 2 -q -p no:cacheprovider 2>&1 \
  | tee "$log"

if ! command -v bazel >/dev/null 2>&1; then
  # Debian's Bazel 4 is the one Bazel reachable offline (see WORKSPACE).
  $sudo_if_needed apt-get update -qq
  $sudo_if_needed apt-get install -y -qq bazel-bootstrap >/dev/null
fi
PATH="$PWD/.venv/bin:$PATH" bazel build //...
PATH="$PWD/.venv/bin:$PATH" bazel test //... --test_size_filters=small

# The documentation site, warnings as errors (broken links and anchors,
# unresolved references in docstrings).
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict -q \
  --site-dir "$site"

# One closing line for the whole run (pytest's counts; Bazel passed above).
passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -1 | grep -Eo '[0-9]+')
echo "tests: ${passed:-0} passed, 0 failed"
