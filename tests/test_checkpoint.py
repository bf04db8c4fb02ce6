"""Fault tolerance: kills, preemption, damaged checkpoints, restore onto any mesh, wrong
checkpoints, non-finite losses."""

import glob
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

from dit_jax import checkpoint, experiment, parallel, storage
from dit_jax.errors import ConfigError, TrainingStopped
from dit_jax.evaluation import runner, sampling
from dit_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
# The suite's tiny run (the programs it compiles are cached), longer and checkpointed more often.
CLI = [
  *_cli.TINY,
  f"--config.train.num_steps={STEPS}",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=3",
]
BATCH = 8  # _cli.TINY's


def cli_config():
  """The config CLI describes, for reading its checkpoints in this process."""
  return tiny_config(num_steps=STEPS)


def _main(workdir, driver=None, cwd=REPO, **env):
  driver = [os.path.join(REPO, "tests/_kill_driver.py")] if driver else ["-m", "dit_jax.main"]
  config = [a.replace("configs/", os.path.join(REPO, "configs/")) for a in CLI]
  return subprocess.Popen(
    [sys.executable, *driver, *config, f"--workdir={workdir}"],
    cwd=cwd,
    # One device: the kill tests are about the checkpoint, and compile faster on few cores.
    env={
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_PLATFORMS": "cpu",
      **env,
    },
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _logged_steps(workdir):
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  lines = storage.read_text(path).splitlines(keepends=True)
  return [json.loads(line)["step"] for line in lines if line.endswith("\n")]


def _wait_for_step(proc, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if _logged_steps(workdir) and max(_logged_steps(workdir)) >= step:
      return
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def _losses(workdir):
  rows = [
    json.loads(line)
    for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
  ]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # No gaps, no duplicates.
  return [r["loss"] for r in rows]


def _final_state(workdir):
  exp = experiment.build(cli_config())
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    assert ckpt.all_steps()[-1] == STEPS
    return jax.device_get(ckpt.restore_train(STEPS, exp.abstract_state))
  finally:
    ckpt.close()


def _assert_same_run(workdir, reference):
  assert _losses(workdir) == _losses(reference)
  a, b = _final_state(workdir), _final_state(reference)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  code, out = _finish(_main(workdir))
  assert code == 0, out[-3000:]
  return workdir


@pytest.mark.multiprocess
def test_sigkill_between_checkpoints_resumes_bitwise(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  proc = _main(workdir)
  _wait_for_step(proc, workdir, 5)  # Checkpoint 3 is the newest; steps 4-5 are lost.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _finish(_main(workdir))[0] == 0
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.multiprocess
def test_sigkill_on_a_gs_workdir_resumes_bitwise(uninterrupted, gcs, tmp_path):
  """The run on GCS (an emulator): killed between checkpoints, resumed, the same losses and state
  as the local uninterrupted run; nothing is written in the current directory."""
  workdir, cwd = gcs.url("killed"), tmp_path / "cwd"
  cwd.mkdir()
  proc = _main(workdir, cwd=str(cwd))
  _wait_for_step(proc, workdir, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out = _finish(_main(workdir, cwd=str(cwd)))
  assert code == 0, out[-3000:]
  _assert_same_run(workdir, uninterrupted)
  assert os.listdir(cwd) == []
  assert storage.listdir(workdir) == ["checkpoints", "images", "metrics.jsonl", "tensorboard"]


@pytest.mark.multiprocess
def test_sigkill_during_an_async_save_resumes_bitwise(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  code, out = _finish(_main(workdir, driver=True, KILL_AT_SAVE="6"))
  assert code == -signal.SIGKILL and "killing myself during the save of 6" in out, out[-2000:]
  steps = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
  assert steps == [3], steps  # 6 was still being written: resume must start from 3.
  code, out = _finish(_main(workdir))
  assert code == 0, out[-3000:]
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.multiprocess
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  proc = _main(workdir)
  _wait_for_step(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc)
  assert code == 0, out[-3000:]
  line = next(x for x in out.splitlines() if "Preempted (SIGTERM): saved checkpoint" in x)
  saved = int(line.split("saved checkpoint ")[1].split()[0])
  # Saved promptly (before the run would have ended), at a step boundary; that step may also be
  # a periodic checkpoint step when the signal lands just before one.
  assert 4 <= saved < STEPS
  assert max(checkpoint.Checkpointer(workdir, read_only=True).all_steps()) == saved
  assert _finish(_main(workdir))[0] == 0
  _assert_same_run(workdir, uninterrupted)


def tiny_config(**train):
  c = _cli.tiny_config(train__log_every=1, train__checkpoint_every=3)
  for k, v in train.items():
    c.train[k] = v
  return c


def _corrupt(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"\0garbage")


@pytest.mark.integration
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "run")
  loop.run(tiny_config(num_steps=9), straight)
  loop.run(tiny_config(num_steps=6), workdir)
  loop.run(tiny_config(num_steps=9), workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "9"))
  # Sampling reads the newest readable EMA parameters and leaves the damaged one in place.
  assert runner.restore_params(experiment.build(tiny_config()), workdir)[1] == 6
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "9"))
  loop.run(tiny_config(num_steps=9), workdir)  # Warns, resumes from 6, redoes 7-9.
  assert glob.glob(os.path.join(workdir, "checkpoints", "9.damaged-*"))  # Moved, not deleted.
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [3, 6, 9]
  exp = experiment.build(tiny_config())
  a = jax.device_get(ckpt.restore_train(9, exp.abstract_state))
  b = jax.device_get(
    checkpoint.Checkpointer(straight, read_only=True).restore_train(9, exp.abstract_state)
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.integration
def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  workdir = str(tmp_path)
  loop.run(tiny_config(num_steps=3), workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "3"))
  with pytest.raises(checkpoint.CheckpointError, match="Not starting from scratch"):
    loop.run(tiny_config(num_steps=6), workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))  # Left where it was.


FSDP8 = ("fsdp", (1, 8, 1))


def _with_mesh(config, preset, mesh):
  config.parallel.preset = preset
  config.parallel.mesh.data, config.parallel.mesh.fsdp, config.parallel.mesh.tensor = mesh
  return config


@pytest.mark.sharding
@pytest.mark.parametrize("train_on, sample_on", [("fsdp8", "one"), ("one", "fsdp8")])
def test_restore_onto_any_mesh(tmp_path, train_on, sample_on):
  layouts = {
    "fsdp8": (_with_mesh(tiny_config(num_steps=3), *FSDP8), jax.devices()),
    "one": (tiny_config(num_steps=3), jax.devices()[:1]),
  }
  config, devices = layouts[train_on]
  exp = experiment.build(config, devices=devices)
  with exp.context():  # Train in-process on the chosen devices.
    state = exp.init_state()
    step_fn = exp.jit_train_step()
    rng = np.random.default_rng(0)
    for _ in range(3):
      batch = {
        "image": rng.uniform(-1, 1, (BATCH, 16, 16, 1)).astype(np.float32),
        "label": rng.integers(0, 10, BATCH).astype(np.int32),
      }
      state, _ = step_fn(state, parallel.global_batch(batch, exp.mesh))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, state, config)
  ckpt.wait()
  ckpt.close()
  target_config, target_devices = layouts[sample_on]
  target = experiment.build(target_config, devices=target_devices)
  params, step = runner.restore_params(target, str(tmp_path))
  assert step == 3
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params), strict=True):
    assert got.sharding.mesh.size == len(target_devices)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  images, _ = sampling.generate(target, params, 8, seed=0, progress=False)
  assert np.isfinite(images).all()


@pytest.mark.integration
def test_checkpoint_of_another_model_names_the_arrays_and_both_configs(tmp_path):
  loop.run(tiny_config(num_steps=3), str(tmp_path))
  other = tiny_config(num_steps=6)
  other.model.learn_sigma, other.diffusion.objective = True, "eps"
  with pytest.raises(ConfigError) as e:
    loop.run(other, str(tmp_path))
  msg = str(e.value)
  assert "final/linear/kernel: checkpoint (64, 16), model (64, 32)" in msg, msg
  assert "written with model.name='dit' model.variant='tiny/4' model.learn_sigma=False" in msg
  assert "this run has model.name='dit' model.variant='tiny/4' model.learn_sigma=True" in msg
  # Same arrays, another meaning of the output: sampling it would silently give noise.
  misread = tiny_config(num_steps=3)
  misread.diffusion.objective, misread.diffusion.preconditioning = "v", "none"
  with pytest.raises(ConfigError) as e:
    runner.restore_params(experiment.build(misread), str(tmp_path))
  msg = str(e.value)
  assert "diffusion.objective='rectified_flow' in the checkpoint, 'v' in this run" in msg, msg
  assert "diffusion.preconditioning='edm' in the checkpoint, 'none' in this run" in msg, msg
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).all_steps() == [3]


def test_train_step_drops_a_non_finite_update():
  config = tiny_config()
  exp = experiment.build(config)
  with exp.context():
    state = exp.init_state()
    before = jax.device_get(state)
    bad = {
      "image": np.full((BATCH, 16, 16, 1), np.nan, np.float32),
      "label": np.zeros(BATCH, np.int32),
    }
    state, metrics = exp.jit_train_step()(state, parallel.global_batch(bad, exp.mesh))
  after = jax.device_get(state)
  assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
  assert int(after.step) == 1 and int(after.skipped) == 1
  for name in ("params", "opt_state", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


@pytest.mark.integration
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_exploding_run_stops_or_skips_and_never_saves_nans(tmp_path, policy):
  config = tiny_config(num_steps=12, lr=1e9, grad_clip=0.0, nonfinite=policy)
  workdir = str(tmp_path)
  if policy == "stop":
    with pytest.raises(TrainingStopped, match="non-finite by step"):
      loop.run(config, workdir)
  else:
    metrics = loop.run(config, workdir)
    assert metrics["skipped_steps"] > 0
  exp = experiment.build(config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert policy == "stop" or ckpt.all_steps()[-1] == 12
  for step in ckpt.all_steps():
    state = jax.device_get(ckpt.restore_train(step, exp.abstract_state))
    for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params)):
      assert np.isfinite(x).all(), step


@pytest.mark.integration
def test_keep_every_keeps_milestones_beyond_the_newest(tmp_path):
  loop.run(
    tiny_config(num_steps=10, checkpoint_every=2, keep_checkpoints=2, keep_every=4), str(tmp_path)
  )
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).all_steps() == [4, 8, 10]
