"""Running the command-line programs as a user does, and checking that bad input ends in one clear
line: a non-zero exit, `Error: ...` as the last line of the output, no traceback, and no file in
the workdir changed.

The session fixture `trained_workdir` (tests/conftest.py) is a tiny run trained once through the
CLI with checkpoints at steps 2, 4 and 6; tests that damage or add files copy it first
(`copy_workdir`).
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quickstart shrunk to seconds: these flags with a --workdir train, sample and evaluate. The
# one tiny config of the suite: tests that need other step counts, logging or checkpoint
# intervals change only those, which leave the compiled programs alone (a constant learning rate,
# where the quickstart's cosine would bake num_steps into the train step), so the persistent
# compilation cache serves every run of it, in-process and in subprocesses.
TINY = [
  "--config=configs/quickstart.py",
  "--config.model.variant=tiny/4",
  "--config.train.batch_size=8",
  "--config.train.num_steps=6",
  "--config.train.warmup_steps=0",
  "--config.train.lr_schedule=constant",
  "--config.train.log_every=2",
  "--config.train.checkpoint_every=2",
  "--config.sample.num_images=8",
  "--config.sample.batch_size=8",
  "--config.sample.num_steps=2",
  "--config.eval.num_images=8",
]
TINY_STEPS = 6


def run(
  *args: str,
  module: str = "dit_jax.main",
  devices: int = 1,
  timeout: float = 300,
  cwd: str = REPO,
  **env,
):
  """`python -m module args` in `cwd` (the repository), with `devices` fake CPU devices; returns
  the CompletedProcess with stdout and stderr merged into `.output`."""
  full_env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    **env,
  }
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=cwd,
    env=full_env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=timeout,
  )
  proc.output = proc.stdout
  return proc


def last_line(proc) -> str:
  lines = proc.output.strip().splitlines()
  return lines[-1] if lines else ""


def assert_clear_error(proc, *fragments: str) -> str:
  """Asserts a non-zero exit whose last line is `Error: ...` containing every fragment, and no
  traceback anywhere in the output; returns that line."""
  line = last_line(proc)
  tail = proc.output[-3000:]
  assert proc.returncode != 0, f"exit 0; output ends:\n{tail}"
  assert line.startswith("Error: "), f"last line is not an error:\n{tail}"
  for fragment in fragments:
    assert fragment in line, f"{fragment!r} not in the last line {line!r}"
  assert "Traceback" not in proc.output, f"a traceback in the output:\n{tail}"
  return line


def assert_quiet(proc) -> None:
  """Asserts no traceback and no 'Exception ignored' in the output of a run."""
  for bad in ("Traceback", "Exception ignored"):
    assert bad not in proc.output, f"{bad!r} in the output:\n{proc.output[-3000:]}"


def snapshot(directory: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` (to show that nothing changed)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def copy_workdir(source: str, target: str) -> str:
  shutil.copytree(source, target)
  return target


def tiny_config(config_file: str = "configs/quickstart.py", **fields):
  """The config of `TINY` (the run of the `trained_workdir` fixture), built in-process, with
  `section__name=value` fields set on top; `config_file` replaces the quickstart's config file
  (e.g. configs/quickstart_classifier.py for the `classifier_workdir` fixture)."""
  path = os.path.join(REPO, config_file)
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for flag in TINY[1:]:
    key, value = flag.removeprefix("--config.").split("=")
    section, name = key.split(".")
    config[section][name] = type(config[section][name])(value)
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config
