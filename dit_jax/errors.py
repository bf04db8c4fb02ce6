"""User-facing errors: one sentence that names the problem and the fix.

Every error a user can act on derives from `UserError`; the programs end with it as one line,
`Error: <message>`, and no traceback (`dit_jax.cli.run`). `ConfigError` and what derives from it
(`DataError`, `CheckpointError`, `StorageError`) are inputs that cannot work; `TrainingStopped` is a
run that stopped on purpose (a non-finite loss, Ctrl-C, preemption).
"""

import math
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


# What a number in a config accepts: the words of the error message and the test.
_ACCEPTS = {
  "> 0": lambda v: v > 0,
  ">= 0": lambda v: v >= 0,
  "in [0, 1)": lambda v: 0 <= v < 1,
  "in [0, 1]": lambda v: 0 <= v <= 1,
  "in [0, 2**32)": lambda v: 0 <= v < 2**32,  # JAX keys take 32 bits; numpy's seeds are >= 0.
  "a finite number": lambda v: True,
}


def check_numbers(config, numbers: Iterable[tuple[str, str, str]]) -> None:
  """Raises a ConfigError for the first of `numbers`, (field such as "train.lr", what it accepts:
  a key of `_ACCEPTS` such as "> 0", what the value means), whose value in `config` is not
  accepted (NaN and infinity never are)."""
  for field, accepted, meaning in numbers:
    section, name = field.split(".")
    value = config[section][name]
    if not (math.isfinite(value) and _ACCEPTS[accepted](value)):
      raise ConfigError(f"config.{field}={value} must be {accepted}{meaning}.")
