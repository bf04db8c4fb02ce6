"""User-facing errors: one sentence that names the problem and the fix.

Every error a user can act on derives from `UserError`; the programs end with it as one line,
`Error: <message>`, and no traceback (`dit_jax.cli.run`). `ConfigError` and what derives from it
(`DataError`, `CheckpointError`, `StorageError`) are inputs that cannot work; `TrainingStopped` is a
run that stopped on purpose (a non-finite loss, Ctrl-C, preemption).
"""

from collections.abc import Iterable


class UserError(Exception):
  """A problem the user can fix, said in one line."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field and the accepted values."""


class TrainingStopped(UserError):
  """The run stopped on purpose (e.g. a non-finite loss); the message says why and what to do."""


def check_choice(value: str, choices: Iterable[str], field: str, prefix: str = "config.") -> str:
  """Returns `value` if it is one of `choices`, else raises a ConfigError naming `field` (a config
  field, or with prefix="" a flag or argument as written, e.g. "--format")."""
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"{prefix}{field}={value!r} is not supported; choose one of {list(choices)}.")
  return value
