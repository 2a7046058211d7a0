"""Writes the library section of BUILD from the imports of keras_mas/.

  python3 tools/build_targets.py

One py_library per module of keras_mas/<subpackage>/, its deps its imports
of other keras_mas modules; one per subpackage's __init__. Run it after
adding, moving or re-importing a module; the apps, examples and tests
sections of BUILD are kept as they are.
"""
import os, re
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKGS = ["core", "importance", "data", "task_free", "experiments"]
modules = {}
for pkg in PKGS:
  for f in sorted(os.listdir(f"keras_mas/{pkg}")):
    if f.endswith(".py") and f != "__init__.py":
      modules[f"{pkg}.{f[:-3]}"] = f"keras_mas/{pkg}/{f}"

def target(mod):  # "core.models" -> "core_models"; "core" -> "core"
  return re.sub(r"\.+_?", "_", mod)

def deps_of(path, own_pkg=None):
  s = open(path).read()
  deps = set()
  for m in re.finditer(r"^\s*from keras_mas(?:\.(\w+))?(?:\.(\w+))? import (\w+)", s, re.M):
    pkg, sub, name = m.group(1), m.group(2), m.group(3)
    if sub is not None:
      deps.add(f"{pkg}.{sub}")
      continue
    if pkg is None:
      if name in PKGS or name == "_lazy": deps.add(name)
      continue
    full = f"{pkg}.{name}"
    deps.add(full if full in modules else pkg)
  for m in re.finditer(r'import_module\(\s*"keras_mas\.(\w+)\.(\w+)"', s):
    deps.add(f"{m.group(1)}.{m.group(2)}")
  return sorted(deps)

def lib(name, srcs, deps, comment=None, imports=False):
  out = []
  if comment: out.append(f"# {comment}")
  out.append("py_library(")
  out.append(f'    name = "{name}",')
  out.append(f'    srcs = [{", ".join(chr(34)+s+chr(34) for s in srcs)}],')
  if imports:
    out.append('    imports = ["."],')
  if deps:
    out.append("    deps = [")
    out += [f'        ":{d}",' for d in deps]
    out.append("    ],")
  out.append(")")
  return "\n".join(out)

blocks = ["# --- Library: one target per module (deps are its imports). " + "-" * 11,
          lib("lazy", ["keras_mas/_lazy.py"], [])]
titles = {"core": "the method: MASModel, penalty, state, regularizer",
          "importance": "importance estimators and per-sample gradients",
          "data": "task sequences and their data",
          "task_free": "task-free consolidation",
          "experiments": "the experiment harness the apps drive"}
for pkg in PKGS:
  blocks.append(f"# --- keras_mas/{pkg}: {titles[pkg]}. " + "-" * max(0, 60 - len(pkg) - len(titles[pkg])))
  init = f"keras_mas/{pkg}/__init__.py"
  init_deps = [target(d) for d in deps_of(init) if d != pkg]
  blocks.append(lib(pkg, [init], init_deps + [] , None))
  for mod, path in modules.items():
    if mod.split(".")[0] != pkg: continue
    deps = [target(d) for d in deps_of(path) if d != mod]
    deps = [d for d in deps if d != pkg]  # Its __init__ imports it.
    blocks.append(lib(target(mod), [path], sorted(set(deps))))
top_deps = sorted({target(d) for d in deps_of("keras_mas/__init__.py")} | set(PKGS) | {target(m) for m in modules})
blocks.append("# The package: `import keras_mas` loads its core and every other module on\n# first use, so it carries them all.")
blocks.append(lib("keras_mas", ["keras_mas/__init__.py", "keras_mas/_aliases.py"], top_deps, imports=True))
text = "\n\n".join(blocks) + "\n"
build = open("BUILD").read()
start = build.index("# --- Library")
end = build.index("# --- Apps.")
build = build[:start] + text + "\n" + build[end:]
build = build.replace('":_lazy"', '":lazy"')
open("BUILD", "w").write(build)
