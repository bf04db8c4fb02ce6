"""User-facing errors: one sentence that names the config field and the fix."""

from collections.abc import Iterable


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the accepted values."""


class TrainingStopped(ConfigError):
  """The run stopped on purpose (e.g. a non-finite loss); the message says why and what to do."""


def check_choice(value: str, choices: Iterable[str], field: str) -> str:
  """Returns `value` if it is one of `choices`, else raises a ConfigError naming `field`."""
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{field}={value!r} is not supported; choose one of {list(choices)}.")
  return value
