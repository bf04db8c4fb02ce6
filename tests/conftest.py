"""Every test runs with 8 fake CPU devices, as a small pod would have."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Where libtpu is installed (for the ahead-of-time compile test) no TPU is used: let processes
# load it side by side instead of locking it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny quickstart run trained once through the CLI (checkpoints at steps 2, 4 and 6, one
  device); read it, or copy it (`_cli.copy_workdir`) before changing anything in it."""
  import _cli

  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.output[-3000:]
  return workdir


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
  """Random weights of the real FID Inception, as the converted .npz (no torch), written once."""
  from dit_jax.evaluation import inception

  path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
  inception.random_weights(path, seed=0)
  return path


@pytest.fixture(scope="session")
def classifier_workdir(tmp_path_factory):
  """A tiny noise-aware digit classifier (configs/quickstart_classifier.py shrunk like `TINY`),
  trained once through the CLI: checkpoints at steps 2 and 4, one device."""
  import _cli

  workdir = str(tmp_path_factory.mktemp("classifier") / "run")
  flags = [f for f in _cli.TINY if not f.startswith(("--config=", "--config.train.num_steps"))]
  proc = _cli.run(
    "--config=configs/quickstart_classifier.py",
    *flags,
    "--config.train.num_steps=4",
    f"--workdir={workdir}",
  )
  assert proc.returncode == 0, proc.output[-3000:]
  return workdir
