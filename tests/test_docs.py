"""The docs hold: README stays a front door, its test command is the one CI runs, every link
resolves, and every `python -m` command shown in README.md and docs/ names flags its program
defines and config fields its config has (read from the sources and configs, nothing run)."""

import ast
import functools
import glob
import importlib.util
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [
  *(os.path.join(REPO, f) for f in ("README.md", "CHANGELOG.md")),
  *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`(python -m [^`]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _rel(path: str) -> str:
  return os.path.relpath(path, REPO)


def _commands(page: str) -> list[str]:
  """The `python -m ...` commands of a page's code blocks (continued lines joined, one per `&&`
  part) and of its inline code."""
  found = []
  for block in _FENCE.findall(page):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0]  # A trailing comment.
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("python -m "):
          found.append(part)
  return found + [m for m in _INLINE.findall(page)]


def _anchors(page: str) -> set[str]:
  """GitHub's anchors of a page's headings."""
  out = set()
  for heading in re.findall(r"^#+ (.+)$", page, re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug)
  return out


def test_readme_is_a_front_door_whose_test_command_ci_runs():
  readme = _read(os.path.join(REPO, "README.md"))
  assert len(readme.splitlines()) <= 200, "README.md runs past 200 lines; move detail to docs/"
  blocks = _FENCE.findall(readme)
  assert "python -m dit_jax.main --config=configs/quickstart.py" in blocks[0]
  ci = [line for line in _read(os.path.join(REPO, ".ci", "run")).splitlines() if line.strip()]
  test_command = ci[-1].replace("python -m pytest", "", 1).strip()
  assert ci[-1].startswith("python -m pytest") and test_command in blocks[1], (
    "README's second command is not the test command .ci/run runs"
  )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
  text, base = _read(page), os.path.dirname(page)
  for match in _LINK.finditer(text):
    target = match.group(1) or match.group(2)
    if re.match(r"^[a-z]+://|^mailto:", target):
      continue
    file, _, anchor = target.partition("#")
    path = os.path.normpath(os.path.join(base, file)) if file else page
    assert os.path.exists(path), f"{_rel(page)} links to {target}, which does not exist"
    if anchor and path.endswith(".md"):
      assert anchor in _anchors(_read(path)), f"{_rel(page)}: no heading #{anchor} in {file}"


@functools.cache
def _flags_of(module: str) -> set[str] | None:
  """The flag names `module` (a file of this repository) defines, read from its source; None for
  a module that is not this repository's."""
  path = os.path.join(REPO, *module.split(".")) + ".py"
  if not os.path.isfile(path):
    return None
  names = set()
  for node in ast.walk(ast.parse(_read(path))):
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr.startswith("DEFINE_")
      and node.args
      and isinstance(node.args[0], ast.Constant)
    ):
      names.add(node.args[0].value)
  return names


@functools.cache
def _config(spec: str):
  """The config `configs/<file>.py[:arg]` gives, or None for a placeholder path."""
  file, _, arg = spec.partition(":")
  path = os.path.join(REPO, file)
  if not os.path.isfile(path):
    return None
  loader = importlib.util.spec_from_file_location(f"_docs_config_{abs(hash(file))}", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


_PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\[")


def _command_problems(command: str) -> list[str]:
  try:
    words = shlex.split(command)
  except ValueError as e:
    return [f"does not parse as a shell command ({e})"]
  module, args = words[2], words[3:]
  if "--" in args:  # launch.local passes what follows to each process's dit_jax.main.
    at = args.index("--")
    return _args_problems(module, args[:at]) + _args_problems("dit_jax.main", args[at + 1 :])
  return _args_problems(module, args)


def _args_problems(module: str, args: list[str]) -> list[str]:
  flags = _flags_of(module)
  if flags is None:
    return []
  problems, config = [], None
  for arg in args:
    if not arg.startswith("--") or _PLACEHOLDER.search(arg.split("=")[0]):
      continue
    name, _, value = arg[2:].partition("=")
    if name.startswith("config.") and "config" in flags:
      continue  # Checked below, once the config is known.
    base = name.removeprefix("no") if name not in flags else name
    if base not in flags:
      problems.append(f"--{name} is not a flag of {module}")
    if name == "config" and not _PLACEHOLDER.search(value):
      config = _config(value)
      if config is None:
        problems.append(f"--config={value}: no such config file")
  for arg in args:
    field = arg[len("--config.") :].partition("=")[0] if arg.startswith("--config.") else ""
    if field and config is not None and not _PLACEHOLDER.search(field):
      if not _has_field(config, field):
        problems.append(f"--config.{field} is not a field of the config")
  return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_name_real_flags_and_fields(page):
  problems = [
    f"{_rel(page)}: `{command[:90]}`: {problem}"
    for command in _commands(_read(page))
    for problem in _command_problems(command)
  ]
  assert not problems, "\n".join(problems)


def test_the_command_check_finds_wrong_names():
  problems = _command_problems(
    "python -m launch.local --num_processes=2 -- --config=configs/quickstart.py "
    "--config.train.num_stepz=3 --workdr=x"
  )
  assert problems == [
    "--workdr is not a flag of dit_jax.main",
    "--config.train.num_stepz is not a field of the config",
  ]
  assert _command_problems("python -m dit_jax.tools.encode_text --formt=npy") == [
    "--formt is not a flag of dit_jax.tools.encode_text"
  ]
  assert _command_problems("python -m dit_jax.main --config=configs/nope.py") == [
    "--config=configs/nope.py: no such config file"
  ]
  assert (
    _command_problems("python -m dit_jax.main --config=configs/quickstart.py --nooverwrite") == []
  )
