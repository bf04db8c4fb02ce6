"""How every command-line program of the package starts: `cli.run(main)` instead of `app.run(main)`.

A bad command line ends in one last line `Error: <problem and fix>` and exit status 1, never in a
traceback or absl's "FATAL Flags parsing error". absl and ml_collections report these mistakes in
different ways, each handled here:

- absl's `flags.Error`: an unknown flag, a value of the wrong type (also of a `--config.<field>`),
  a missing required flag, a config file whose `get_config` raised (wrapped with its traceback
  as text; the message of the original exception is kept, ConfigError's as it is);
- any other exception (KeyError, AttributeError, NameError, OSError, SyntaxError, ...), which
  ml_collections lets through while it loads a config file, runs its `get_config` and applies the
  `--config.<field>` overrides: they are explained by checking the file and the field paths
  again (a mistake in the file's own code is named with its line); one that cannot be explained
  (a bug, e.g. raised inside this package) goes on as it is;
- absl's message when not exactly one of a group of flags is given, without the values it lists
  (a config flag's is the whole config);
- a config file that cannot be read, which ml_collections reports only when the config is first
  used: checked right after parsing.

The program's own ConfigError and `app.UsageError` end the same way.
"""

import ast
import difflib
import importlib.machinery
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags
from ml_collections.config_flags.config_flags import is_config_flag

from dit_jax import storage, xla_flags
from dit_jax.errors import ConfigError, UserError

_CONTRACT = "(docs/configs.md: the config contract)"
_HELP = "pass --helpshort to list the flags"
# ml_collections wraps an exception of get_config into one of the same type with this text and
# the traceback (the original is its context); absl wraps that into a flag error.
_WRAPPER_TEXT = "Error whilst parsing config file:"


def run(main: Callable[[list[str]], Any], *, positional: bool = False) -> None:
  """Runs `main` as `absl.app.run` does, ending a bad command line in one `Error: ...` line.

  Args:
    main: the program; it gets the arguments left after the flags (argv[0] first).
    positional: whether the program takes arguments that are not flags (those after `--`);
      if False, any is an error.
  """

  # Before JAX starts a backend (nothing computes at import).
  xla_flags.apply()
  platforms = platforms_without_tpu(
    os.environ.get("JAX_PLATFORMS", ""), _has_tpu_device(), _installed("libtpu"), _has_cuda_plugin()
  )
  if platforms:
    os.environ["JAX_PLATFORMS"] = platforms

  def main_with_clear_errors(argv: list[str]) -> Any:
    try:
      return main(argv)
    except UserError as e:
      _fail(str(e))
    except app.UsageError as e:
      _fail(f"{e}; {_HELP}.")

  app.run(main_with_clear_errors, flags_parser=lambda argv: parse_flags(argv, positional))


def platforms_without_tpu(
  jax_platforms: str, has_tpu_device: bool, has_libtpu: bool, has_cuda: bool
) -> str | None:
  """The JAX_PLATFORMS to set so that JAX does not start libtpu on a machine without a TPU, or None
  to leave JAX's choice alone. libtpu (the `tpu` extra, also for the ahead-of-time fit checks)
  probes the cloud metadata server at start-up and prints a screen of errors where there is none.
  A machine with a CUDA plugin is left alone (JAX would pick its GPU), as is a JAX_PLATFORMS the
  user set."""
  if jax_platforms or has_tpu_device or not has_libtpu or has_cuda:
    return None
  return "cpu"


def _has_tpu_device() -> bool:
  import glob

  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _installed(module: str) -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A dotted name whose parent package is missing.
    return False


def _has_cuda_plugin() -> bool:
  return any(
    _installed(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12")
  )


def parse_flags(argv: Sequence[str], positional: bool = False) -> list[str]:
  """Parses `argv` into absl's FLAGS and returns the arguments left; exits with `Error: ...` on
  a mistake in the command line."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(flag_error_message(e))
  except Exception:  # What ml_collections lets through, e.g. a NameError in a config file.
    message = explain_config_flags(argv)
    if message is None:
      raise
    _fail(message)
  for flag in _config_flags():
    # ml_collections keeps a config file that it could not read as a placeholder that raises
    # when first used, which would be deep inside the program.
    if flag.present and not isinstance(flag.value, ml_collections.ConfigDict):
      message = explain_config_flags(argv)
      _fail(message or f"--{flag.name}={flag.config_filename}: get_config returned no ConfigDict.")
  if len(rest) > 1 and not positional:
    _fail(f"unexpected arguments {rest[1:]}; every option is a --flag=value ({_HELP}).")
  return rest


def flag_error_message(error: flags.Error) -> str:
  """The one-line message for an error of absl's flag parsing."""
  text = str(error)
  one_of = re.search(
    r"(Exactly|At most) one of \(([^)]*)\) must have a value other than None", text
  )
  if one_of:
    # absl names the value of every flag, which for a config flag is the whole config.
    names = one_of.group(2).split(", ")
    given = [f"--{n}" for n in names if n in flags.FLAGS and flags.FLAGS[n].value is not None]
    return (
      f"pass {one_of.group(1).lower()} one of {', '.join(f'--{n}' for n in names)} "
      f"(got {', '.join(given) or 'none'}); {_HELP}."
    )
  flag, wrapped, _ = text.partition(f": {_WRAPPER_TEXT}")
  if wrapped:
    flag = flag.removeprefix("flag ")
    cause = _original(error)
    if isinstance(cause, ConfigError):
      return f"{flag}: {cause}"
    return f"{flag}: get_config raised {type(cause).__name__}: {cause}"
  return f"{' '.join(text.split()).rstrip('.')}; {_HELP}."


def explain_config_flags(argv: Sequence[str]) -> str | None:
  """Checks every config flag's file and `--<name>.<field>` overrides in `argv` again; returns
  the message for the first problem found, or None if there is none."""
  args = flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)
  if "--" in args:
    args = args[: args.index("--")]
  for flag in _config_flags():
    argument = _flag_argument(args, flag.name)
    if argument is None:
      continue
    overrides = [
      a.split("=", 1)[0].split(".", 1)[1]
      for a in args
      if re.match(rf"--?(no)?{re.escape(flag.name)}\.", a)
    ]
    message = _explain_config_file(flag.name, argument, overrides)
    if message:
      return message
  return None


def _explain_config_file(name: str, argument: str, overrides: list[str]) -> str | None:
  path, has_arg, arg = argument.partition(":")
  flag = f"--{name}={argument}"
  if os.path.isdir(path):
    return f"{flag}: {path} is a directory; pass a config file such as configs/quickstart.py."
  if not os.path.isfile(path):
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    return f"{flag}: there is no file {path}{where}; the shipped configs are in configs/."
  loader = importlib.machinery.SourceFileLoader(f"_dit_jax_cli_{name}", path)
  module = types.ModuleType(loader.name)
  module.__file__ = path
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    return f"{flag}: {e.msg} in {e.filename}, line {e.lineno}; fix the config file."
  if not callable(getattr(module, "get_config", None)):
    return (
      f"{flag}: {path} has no get_config; a config file defines get_config(arg) that returns "
      "the ConfigDict (see configs/quickstart.py)."
    )
  try:
    config = module.get_config(*([arg] if has_arg else []))
  except (ConfigError, OSError) as e:
    return f"{flag}: {e}"
  except Exception as e:
    # A mistake in the config file's own code (a NameError, a misspelt field of a ConfigDict):
    # one line naming its line. One raised inside this package is a bug and goes on as it is.
    frames = traceback.extract_tb(e.__traceback__)
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    if os.path.abspath(frames[-1].filename).startswith(package):
      return None
    line = [f.lineno for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f" ({path}, line {line[-1]})" if line else ""
    return f"{flag}: get_config raised {type(e).__name__}: {_plain(e)}{where}; fix the config file."
  for override in overrides:
    message = _explain_field(config, name, override)
    if message:
      return message
  return None


def _explain_field(config: Any, name: str, path: str) -> str | None:
  """The message for an override `--<name>.<path>` that names no field of `config`, else None."""
  node, walked = config, name
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (
        f"{walked} is a value, not a group of fields, so --{name}.{path} cannot be set {_CONTRACT}."
      )
    if key not in node:
      close = difflib.get_close_matches(key, list(node.keys()), n=1)
      hint = f"did you mean {walked}.{close[0]}?" if close else f"{walked} has {', '.join(node)}."
      return f"{walked}.{key} is not a config field; {hint} {_CONTRACT}"
    node, walked = node[key], f"{walked}.{key}"
  return None


def _plain(error: BaseException) -> str:
  """The message of `error` on one line; a repr of a text of several lines (ml_collections'
  AttributeError, made from a KeyError's message) is unquoted."""
  text = str(error)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" and "\\n" in text:
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  return " ".join(text.split())


def _flag_argument(args: list[str], name: str) -> str | None:
  """The last value given to --name in `args` (as `--name=v`, `-name=v` or `--name v`)."""
  value = None
  for i, a in enumerate(args):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", a)
    if m and m.group(1):
      value = m.group(2)
    elif m and i + 1 < len(args):
      value = args[i + 1]
  return value


def _config_flags() -> list[flags.Flag]:
  found = {id(f): f for f in (flags.FLAGS[n] for n in flags.FLAGS) if is_config_flag(f)}
  return list(found.values())


def _original(error: BaseException) -> BaseException:
  """The exception that get_config raised, behind absl's and ml_collections' wrappers."""
  while not str(error).startswith(_WRAPPER_TEXT) and error.__context__ is not None:
    error = error.__context__
  return error.__context__ or error


def workdir_error(error: OSError, workdir: str) -> str | None:
  """The one-line message for an OSError about `workdir`, a file in it or a directory on the way
  to it (one that cannot be created or written: no permission, a read-only or missing file
  system, a full disk); None for an error about another file."""
  if not error.filename or not workdir:
    return None
  path, root = os.path.abspath(os.fsdecode(error.filename)), os.path.abspath(workdir)
  inside, on_the_way = path.startswith(root + os.sep), root.startswith(path.rstrip(os.sep) + os.sep)
  if path != root and not inside and not on_the_way:
    return None
  return (
    f"{error.strerror or error}: {path} (in --workdir={workdir}); check that it can be written "
    "(permissions, free space) or pass another --workdir."
  )


def _fail(message: str) -> NoReturn:
  sys.exit(f"Error: {message}")


# The fields of a config that name files or directories (local, or gs:// URLs).
CONFIG_PATH_FIELDS = (
  "data.path",
  "vae.path",
  "train.init_from",
  "sample.prompts",
  "sample.classifier.workdir",
  "sample.guide.workdir",
  "eval.reference",
  "eval.inception_weights",
)


def check_config_paths(config: ml_collections.ConfigDict) -> None:
  """One clear error now, not a minute of retries later, for a gs:// path of the config whose
  service or bucket cannot be reached (or without the gcs extra)."""
  for field in CONFIG_PATH_FIELDS:
    value = config
    for part in field.split("."):
      value = value.get(part, "") if hasattr(value, "get") else ""
    if storage.is_remote(str(value)):
      try:
        storage.check_reachable(str(value))
      except ConfigError as e:
        raise ConfigError(f"config.{field}: {e}") from None
