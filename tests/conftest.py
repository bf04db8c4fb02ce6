"""The suite's process set-up: 8 fake CPU devices, a persistent XLA compilation cache that every
subprocess inherits, the tiers, and a compile-time table per test file at the end of the run.

Tiers (markers; docs/testing.md gives their budgets):
- unmarked: in-process, on one device: the default mesh (`parallel.default_devices`) is narrowed
  to the first device, so a tiny step compiles as a one-device program, as in the subprocesses;
- `sharding`: in-process on all 8 devices (the default mesh spans them), for tests about
  sharding, meshes and device counts;
- `integration`: in-process end-to-end runs (train, resume, sample, evaluate) that compile
  several programs;
- `multiprocess`: tests that start programs: the command lines, kills and signals, pods.
`integration` and `multiprocess` are also `slow`: `-m "not slow"` runs the first two tiers.
"""

import os
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# The suite's programs are tiny, so XLA's compile time is nearly all of its time, and most of that
# is LLVM optimizing machine code that then runs for milliseconds: compile without it (-O0; the
# matmuls and convolutions still run in the same library kernels). Every subprocess gets the flag
# too (tests/_site/sitecustomize.py), whatever XLA_FLAGS its test gives it.
os.environ["DIT_JAX_TEST_XLA_FLAGS"] = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
  [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    os.environ["DIT_JAX_TEST_XLA_FLAGS"],
  ]
).strip()
# The CPU flags the programs add as they start (dit_jax.xla_flags), for the tests' own process.
from dit_jax import xla_flags  # noqa: E402

xla_flags.apply()
# Where libtpu is installed (for the ahead-of-time compile test) no TPU is used: let processes
# load it side by side instead of locking it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One compilation cache for the whole run, pytest's workers and every program they start: the
# same tiny programs compile once. Kept in the checkout (ignored by git) so a rerun starts warm;
# the minimums at 0 make JAX cache the small programs too, which is all that tests compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Subprocesses load tests/_site/sitecustomize.py, which logs their compile time too.
os.environ["PYTHONPATH"] = os.pathsep.join(
  [os.path.join(TESTS, "_site"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import _compile_log  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from dit_jax import parallel  # noqa: E402

_ALL_DEVICES = parallel.default_devices


def _first_device() -> list:
  return jax.devices()[:1]


def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # The controller (or a run without xdist).
    log = tempfile.NamedTemporaryFile(prefix="dit_jax_compiles_", suffix=".jsonl", delete=False)
    log.close()
    os.environ[_compile_log.ENV_LOG] = log.name  # pytest-xdist's workers inherit it.
    config._compile_log = log.name
  _compile_log.listen(jax.monitoring)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("integration") or item.get_closest_marker("multiprocess"):
      item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  # Fixtures set up for the test count for its file, and so do the programs it starts.
  os.environ[_compile_log.ENV_FILE] = os.path.relpath(str(item.path), REPO)
  yield


def pytest_runtest_setup(item):
  # Before any fixture of the test is built, module and session ones included: a module whose
  # fixtures build meshes marks all its tests alike.
  sharding = item.get_closest_marker("sharding") is not None
  parallel.default_devices = _ALL_DEVICES if sharding else _first_device


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  path = getattr(config, "_compile_log", None)
  if path is None:
    return
  terminalreporter.section("XLA compile time per test file (in-process and subprocesses)")
  for line in _compile_log.summary(path):
    terminalreporter.write_line(line)
  os.unlink(path)


def shared_dir(tmp_path_factory, name: str, build) -> str:
  """A folder built once per run by `build(path)` and shared by pytest-xdist's workers (a file lock
  makes the others wait for the first); built folders are only read or copied, never changed."""
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The workers' base folders sit side by side in one folder of the run.
  path = root / f"shared_{name}"
  with FileLock(str(path) + ".lock"):
    if not (path / ".built").exists():
      if path.exists():  # A build that failed in another worker: start it over.
        import shutil

        shutil.rmtree(path)
      path.mkdir()
      build(str(path))
      (path / ".built").touch()
  return str(path)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny quickstart run trained once through the CLI (checkpoints at steps 2, 4 and 6, one
  device); read it, or copy it (`_cli.copy_workdir`) before changing anything in it."""
  import _cli

  def build(path):
    proc = _cli.run(*_cli.TINY, f"--workdir={path}/run")
    assert proc.returncode == 0, proc.output[-3000:]

  return os.path.join(shared_dir(tmp_path_factory, "trained", build), "run")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
  """Random weights of the real FID Inception, as the converted .npz (no torch), written once."""
  from dit_jax.models import inception

  def build(path):
    inception.random_weights(os.path.join(path, "inception.npz"), seed=0)

  return os.path.join(shared_dir(tmp_path_factory, "inception", build), "inception.npz")


@pytest.fixture(scope="session")
def classifier_workdir(tmp_path_factory):
  """A tiny noise-aware digit classifier (configs/quickstart_classifier.py shrunk like `TINY`),
  trained once through the CLI: checkpoints at steps 2 and 4, one device."""
  import _cli

  flags = [f for f in _cli.TINY if not f.startswith(("--config=", "--config.train.num_steps"))]

  def build(path):
    proc = _cli.run(
      "--config=configs/quickstart_classifier.py",
      *flags,
      "--config.train.num_steps=4",
      f"--workdir={path}/run",
    )
    assert proc.returncode == 0, proc.output[-3000:]

  return os.path.join(shared_dir(tmp_path_factory, "classifier", build), "run")


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 for this worker (tests/_gcs.py); its env is set in os.environ."""
  import _gcs

  emulator = _gcs.Emulator()
  yield emulator
  emulator.stop()
