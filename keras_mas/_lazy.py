"""Modules of a package loaded on first attribute access (PEP 562)."""

import importlib
import pkgutil


def submodules(package, path, extra=()):
  """`(names, __getattr__, __dir__)` for the package `package` at `path`.

  Args:
    package: the package's `__name__`.
    path: its `__path__`.
    extra: more names that import as `package.name` (aliases).
  """
  names = tuple(sorted({m.name for m in pkgutil.iter_modules(path)
                        if not m.name.startswith("_")} | set(extra)))

  def getattr_(name):
    if name in names:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def dir_(namespace):
    return sorted(set(namespace) | set(names))

  return names, getattr_, dir_
