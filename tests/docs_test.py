"""The documentation: README.md and the site under docs/.

Every ```python block runs as written, in a fresh process; every flag of
each app is on docs/reference/flags.md with its default; the site builds
with `mkdocs build --strict` (broken links, anchors and docstring
references fail it).
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS_PAGE = os.path.join("docs", "reference", "flags.md")
_FENCE = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)


def _pages():
  pages = glob.glob(os.path.join(_ROOT, "docs", "**", "*.md"), recursive=True)
  return ["README.md"] + sorted(os.path.relpath(p, _ROOT) for p in pages)


def _read(page):
  with open(os.path.join(_ROOT, page), encoding="utf-8") as f:
    return f.read()


def _blocks_of(page):
  return _FENCE.findall(_read(page))


def _python_blocks():
  """`(where, code)` of every ```python block, each distinct code once."""
  # The README's example is also the getting-started guide's: it runs once.
  blocks = {}
  for page in _pages():
    text = _read(page)
    for match in _FENCE.finditer(text):
      line = text.count("\n", 0, match.start()) + 1
      blocks.setdefault(match.group(1), f"{page}:{line}")
  return [(where, code) for code, where in blocks.items()]


_BLOCKS = _python_blocks()

# How many ```python blocks each page holds. A fence changed to another
# language (or none) would otherwise leave its example unrun, silently.
_EXPECTED_BLOCKS = {
    "README.md": 1,
    "docs/guides/getting-started.md": 2,
    "docs/guides/your-model-and-data.md": 1,
    "docs/guides/language-models.md": 3,
    "docs/guides/task-free.md": 1,
    "docs/guides/baselines-and-lambda.md": 1,
    "docs/guides/several-devices.md": 2,
}


def test_the_pages_have_their_examples():
  counts = {page: len(_blocks_of(page)) for page in _pages()}
  assert {p: n for p, n in counts.items() if n} == _EXPECTED_BLOCKS


def test_no_python_example_hides_behind_another_fence():
  # "```py", "```python3", "``` python", an indented fence: _FENCE runs
  # none of them.
  for page in _pages():
    for line in _read(page).splitlines():
      if re.match(r"^\s*```+\s*\{?\.?py", line, flags=re.I):
        assert line == "```python", f"{page}: {line!r}"


def test_every_public_module_is_in_the_api_reference():
  # A new module would otherwise be missing from the reference, silently.
  reference = "".join(_read(page) for page in _pages()
                      if page.startswith(os.path.join("docs", "reference")))
  shown = set(re.findall(r"^::: (keras_mas[\w.]*)$", reference, flags=re.M))
  modules = {
      "keras_mas." + os.path.relpath(path, os.path.join(_ROOT, "keras_mas"))
      .removesuffix(".py").replace(os.sep, ".")
      for path in glob.glob(os.path.join(_ROOT, "keras_mas", "*", "*.py"))
      if not os.path.basename(path).startswith("_")}
  assert not modules - shown, "add to docs/reference/*.md: " + ", ".join(
      sorted(modules - shown))


def test_the_readme_example_comes_first():
  # tests/backends_test.py runs the README's first block on each backend.
  block = _blocks_of("README.md")[0]
  assert "consolidate" in block and "load_model" in block


def test_the_readme_links_to_files_that_exist():
  # The site's build checks its own links; README.md is not in it.
  targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _read("README.md"))
  assert len(targets) > 10
  missing = [t for t in targets if not os.path.exists(os.path.join(_ROOT, t))]
  assert not missing, f"README.md links to missing files: {missing}"


def _is_slow(code):
  """The two causal-LM blocks (about a minute each under the test run's
  load): the app on a preset, and the library flow on a GPT-2 with LoRA.
  CI runs both routes elsewhere: tests/language_test.py adapts a LoRA
  preset with the app (exported, generating, resumed), tests/lora_test.py
  fits, saves and loads LoRA causal LMs."""
  return "GPT2CausalLM" in code and ("subprocess.run" in code
                                     or "enable_lora" in code)


def test_two_blocks_are_left_to_the_slow_run():
  # A rewritten block would otherwise leave the marker matching nothing.
  assert sum(_is_slow(code) for _, code in _BLOCKS) == 2


@pytest.mark.parametrize(
    "index", [pytest.param(i, marks=pytest.mark.slow) if _is_slow(code) else i
              for i, (_, code) in enumerate(_BLOCKS)],
    ids=[where for where, _ in _BLOCKS])
def test_block_runs_as_written(index, tmp_path):
  where, code = _BLOCKS[index]
  # Its own working directory: blocks save files where they run.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", code],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, (
      f"the block at {where} failed:\n{code}\n{result.stderr[-4000:]}")


def _app_flags(app):
  """`{name: default}` of `apps/<app>.py`'s own flags; None: no default."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  path = os.path.join(_ROOT, "apps", f"{app}.py")
  result = subprocess.run([sys.executable, path, "--helpfull"], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  section = result.stdout.split(f"{app}.py:", 1)[1]
  flags, name = {}, None
  for line in section.splitlines()[1:]:
    if line and not line.startswith(" "):
      break  # The next module's flags.
    found = re.match(r"^  --(?:\[no\])?(\w+)", line)
    if found:
      name = found.group(1)
      flags[name] = None
      continue
    default = re.match(r"^    \(default: '(.*)'\)$", line)
    if default and name:
      flags[name] = default.group(1)
  assert len(flags) > 5, result.stdout[:2000]
  return flags


def _page_flags(app):
  """`{name: default}` of the rows under the page's `## apps/<app>.py`."""
  text = _read(_FLAGS_PAGE)
  section = text.split(f"\n## apps/{app}.py\n", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| `--(\w+)` \| (`[^`]*`|—) \|", section, flags=re.M)
  return {name: None if default == "—" else default.strip("`")
          for name, default in rows}


@pytest.mark.parametrize("app", ["sequential_finetune", "task_free",
                                 "compare"])
def test_the_flags_page_lists_every_flag_with_its_default(app):
  # A page of flags drifts from the apps unless something checks it.
  assert _page_flags(app) == _app_flags(app), (
      f"{_FLAGS_PAGE} (left) against apps/{app}.py --helpfull (right)")


def test_the_site_builds_strictly(tmp_path):
  missing = [m for m in ("mkdocs", "material", "mkdocstrings",
                         "mkdocstrings_handlers.python")
             if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"the site's generator is not installed ({missing}): "
                "pip install -e '.[docs]'")
  # From the root: pymdownx.snippets reads benchmarks/*.md from there.
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict",
       "--site-dir", str(tmp_path / "site")],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert (tmp_path / "site" / "reference" / "flags" / "index.html").exists()


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
