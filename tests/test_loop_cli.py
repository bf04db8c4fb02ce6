"""The training loop as a user meets it: Ctrl-C, a resumed run that is already done, a run that
diverges before its first checkpoint, the last line of a finished run, and what the mesh presets
do with the default mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import _cli
import jax
import numpy as np
import pytest

from dit_jax import experiment, parallel
from dit_jax.config_defaults import base_config


def _logged_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _popen(*args: str) -> subprocess.Popen:
  """`python -m dit_jax.main args` on one fake device, as `_cli.run` starts it, but not waited."""
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
  }
  return subprocess.Popen(
    [sys.executable, "-m", "dit_jax.main", *args],
    cwd=_cli.REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@pytest.mark.multiprocess  # A training subprocess interrupted and rerun.
def test_ctrl_c_saves_at_the_next_step_and_a_rerun_resumes_there(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  # Steps 1-6 are done; no periodic checkpoint can land before the run's end.
  longer = ["--config.train.num_steps=400", "--config.train.log_every=1"]
  proc = _popen(*_cli.TINY, *longer, "--config.train.checkpoint_every=1000", f"--workdir={workdir}")
  deadline = time.time() + 240
  while max(_logged_steps(workdir)) <= _cli.TINY_STEPS + 1:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  proc.output = proc.communicate(timeout=240)[0]
  # Status 1 (loop.Interrupted, a TrainingStopped): the run did not finish, so `train && evaluate`
  # stops here.
  line = _cli.assert_clear_error(proc, "Stopped by Ctrl-C: saved checkpoint", "to resume")
  saved = int(line.split("saved checkpoint ")[1].split()[0])
  assert _cli.TINY_STEPS + 2 <= saved < 400
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))
  # The announcement and the last line are lines of their own, not glued to the progress bar.
  lines = proc.output.splitlines()
  assert any(x.startswith("W") and "] Ctrl-C: stopping at the end" in x for x in lines)

  rerun = _cli.run(*_cli.TINY, f"--config.train.num_steps={saved + 1}", f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.output[-3000:]
  _cli.assert_quiet(rerun)
  assert f"Restored checkpoint {saved} " in rerun.output
  grid = os.path.join(workdir, "images", f"step_{saved + 1:07d}.png")
  assert os.path.isfile(grid)
  assert _cli.last_line(rerun).endswith(
    f"Finished at step {saved + 1}; checkpoint in {workdir}/checkpoints; samples in {grid}."
  )


SECOND_CTRL_C = """
import os, signal, time
from dit_jax.train import loop

with loop.Preemption() as p:
  p.note_checkpoint(6, "/run/checkpoints", complete=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.1)
  assert p.requested() and p.reason == "Ctrl-C"
  os.kill(os.getpid(), signal.SIGINT)  # The same press again (a launcher forwarding it).
  time.sleep(0.1)
  print("same press ignored", flush=True)
  time.sleep(loop.Preemption.SAME_PRESS_S)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(10)
print("not stopped")
"""


@pytest.mark.multiprocess
def test_a_second_ctrl_c_stops_at_once_with_status_130():
  proc = subprocess.run(
    [sys.executable, "-c", SECOND_CTRL_C],
    cwd=_cli.REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=60,
  )
  proc.output = proc.stdout
  assert proc.returncode == 130, proc.stdout[-3000:]
  assert "same press ignored" in proc.stdout and "not stopped" not in proc.stdout
  assert proc.stdout.count("Ctrl-C: stopping at the end") == 1
  assert "Traceback" not in proc.stdout
  assert _cli.last_line(proc).endswith(
    "Second Ctrl-C: stopped at once without saving; the newest checkpoint in /run/checkpoints is "
    "6; rerun the same command to resume from it."
  )


@pytest.mark.multiprocess
def test_num_steps_already_reached_trains_nothing_and_changes_nothing(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  before = _cli.snapshot(workdir)
  proc = _cli.run(*_cli.TINY, "--config.train.num_steps=4", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  assert "already at step 6 >= config.train.num_steps=4, so nothing was trained" in (
    _cli.last_line(proc)
  )
  assert _cli.snapshot(workdir) == before


@pytest.mark.multiprocess
def test_divergence_before_the_first_checkpoint_says_there_is_none(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _cli.run(
    *_cli.TINY,
    "--config.train.num_steps=12",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000",
    "--config.train.lr=1e9",
    "--config.train.grad_clip=0",
    f"--workdir={workdir}",
  )
  _cli.assert_clear_error(proc, "non-finite by step", "no checkpoint was written yet")
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


def _config(preset: str, mesh=parallel.DEFAULT_MESH):
  c = base_config()
  c.model.variant = "tiny/4"
  c.train.batch_size = 8
  c.parallel.preset = preset
  c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = mesh
  return c


@pytest.mark.sharding
def test_preset_fsdp_alone_shards_the_state_over_every_device():
  assert jax.device_count() == 8
  config = _config("fsdp")
  assert dict(parallel.make_mesh(config).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  exp = experiment.build(config)
  device = exp.mesh.devices.flat[0]
  fraction = parallel.device_fraction(exp.abstract_state, device)
  # A few small vectors without an embed dimension (biases of the timestep MLP) stay whole.
  assert 1 / 8 <= fraction < 1 / 8 * 1.1, fraction
  split = 0
  for x in jax.tree.leaves(exp.abstract_state.params):
    if x.ndim == 2 and "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)):
      assert np.prod(x.shape) == 8 * np.prod(x.sharding.shard_shape(x.shape)), x
      split += 1
  assert split > 0
  assert parallel.layout_warnings(config, exp.mesh) == []
  dp = experiment.build(_config("dp"))
  assert dict(dp.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert parallel.device_fraction(dp.abstract_state, dp.mesh.devices.flat[0]) == 1.0


@pytest.mark.sharding
@pytest.mark.parametrize(
  "preset, mesh, shape, idle",
  [
    ("fsdp_tp", parallel.DEFAULT_MESH, (1, 8, 1), "'tensor', which has size 1"),
    ("fsdp", (8, 1, 1), (8, 1, 1), "'fsdp', which has size 1"),  # Explicit: kept, but warned.
    ("fsdp", (2, -1, 1), (2, 4, 1), None),
    ("fsdp_tp", (2, 2, 2), (2, 2, 2), None),
    ("dp", (4, 1, 2), (4, 1, 2), "axis 'tensor' 2 devices, but config.parallel.preset=dp"),
  ],
)
def test_meshes_keep_explicit_sizes_and_warn_of_idle_axes(preset, mesh, shape, idle):
  config = _config(preset, mesh)
  built = parallel.make_mesh(config)
  assert tuple(built.shape.values()) == shape
  warnings = parallel.layout_warnings(config, built)
  if idle is None:
    assert warnings == []
  else:
    assert len(warnings) == 1 and idle in warnings[0], warnings
