"""The package's import graph, read from the sources: no module uses another's private names (nor
do the tests), and no package imports one above it or beside it, so there is no cycle: `train/`
and `evaluation/` share `experiment/` below them and meet only in the entry points above."""

import ast
import collections
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dit_jax")

# From the bottom up: a unit may import the ones before it (and itself), never one after it.
LAYERS = (
  ("errors", "axes", "xla_flags"),
  ("storage",),
  ("utils", "config_defaults", "cli"),
  ("parallel",),
  ("diffusion", "data"),
  ("models",),
  ("conditioning", "vae", "text_encoders", "checkpoint"),
  ("experiment",),
  ("train", "evaluation"),
  ("aot", "checks"),
  ("tools", "benchmark_torch"),
  ("benchmark", "main"),
)


def _module(path: str) -> str:
  rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def _unit(module: str) -> str:
  """`dit_jax.train.loop` -> "train"; `dit_jax.storage` -> "storage"."""
  return module.split(".")[1] if module.count(".") else module


def _is_module(name: str) -> bool:
  path = os.path.join(REPO, *name.split("."))
  return os.path.isfile(path + ".py") or os.path.isdir(path)


def _imports(path: str):
  """(imported dit_jax module, names used from it: {name}) of a file, and its aliases, skipping
  imports for type checkers only."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
      skip.update(id(n) for n in ast.walk(node))
  edges, aliases = collections.defaultdict(set), {}
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dit_jax"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if _is_module(full):
          edges[full]
          aliases[a.asname or a.name] = full
        else:
          edges[node.module].add(a.name)
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("dit_jax"):
          edges[a.name]
          aliases[a.asname or a.name] = a.name
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      if node.value.id in aliases:
        edges[aliases[node.value.id]].add(node.attr)
  return edges


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
  uses = []
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    here = _module(path)
    for module, names in _imports(path).items():
      uses += [f"{here} uses {module}.{n}" for n in sorted(names) if _private(n) and module != here]
  for path in glob.glob(os.path.join(REPO, "tests", "*.py")):
    for module, names in _imports(path).items():
      uses += [f"{os.path.basename(path)} uses {module}.{n}" for n in sorted(names) if _private(n)]
  assert not uses, "\n".join(uses)


def _private_definitions(tree: ast.AST) -> set[str]:
  """Private names a module defines: functions, classes, methods, attributes set on self."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      names.add(node.name)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      names.add(node.id)
    elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
      names.add(node.attr)
  return {n for n in names if _private(n)}


def test_no_module_reaches_into_another_modules_objects():
  """`obj._name` where `_name` is private to another of the package's modules (a method or an
  attribute of its classes): what the import check above cannot see."""
  trees = {
    path: ast.parse(open(path, encoding="utf-8").read())
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
  }
  defined = {path: _private_definitions(tree) for path, tree in trees.items()}
  everywhere = set().union(*defined.values())
  uses = []
  for path, tree in trees.items():
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Attribute) and node.attr in everywhere):
        continue
      if node.attr in defined[path] or getattr(node.value, "id", "") in ("self", "cls"):
        continue
      uses.append(f"{_module(path)}:{node.lineno} uses {node.attr} of another module")
  assert not uses, "\n".join(sorted(uses))


def test_no_package_imports_one_above_it():
  rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
  upward = []
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    here = _unit(_module(path))
    if here == "dit_jax":
      continue
    assert here in rank, f"{here} has no place in LAYERS; give it one"
    for module in _imports(path):
      there = _unit(module)
      if there in (here, "dit_jax"):
        continue
      if rank[there] >= rank[here]:
        upward.append(f"{_module(path)} imports {module} ({there} is not below {here})")
  assert not upward, "\n".join(sorted(set(upward)))
