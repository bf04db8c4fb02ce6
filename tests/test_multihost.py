"""A pod on this machine: 2 processes x 4 CPU devices (jax.distributed over localhost, gloo) must
train like 1 process x 8 devices, and each must restore the other's checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import _cli
import jax
import numpy as np
import pytest

from dit_jax import parallel, storage
from dit_jax.train import loop

pytestmark = [pytest.mark.multiprocess, pytest.mark.sharding]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The same global batches and math, but cross-process reductions may run in another order.
LOSS_RTOL = 1e-5

# The suite's tiny run, logged every step and checkpointed every 3 (num_steps is set after it).
TINY = [*_cli.TINY, "--config.train.log_every=1", "--config.train.checkpoint_every=3"]


def _launch(workdir, processes, devices, steps):
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    f"--num_processes={processes}",
    f"--devices_per_process={devices}",
    "--",
    *TINY,
    f"--workdir={workdir}",
    f"--config.train.num_steps={steps}",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _one_host(workdir, steps):
  """The reference: 1 process x 8 devices, this one (the test runs on all 8)."""
  assert jax.device_count() == len(parallel.default_devices()) == 8
  config = _cli.tiny_config(train__log_every=1, train__checkpoint_every=3, train__num_steps=steps)
  loop.run(config, workdir)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), steps  # One line per step: process 0 alone writes.
  return {r["step"]: r["loss"] for r in rows}


def test_two_processes_train_like_one_and_share_checkpoints(tmp_path):
  pod, host = str(tmp_path / "pod"), str(tmp_path / "host")
  log = _launch(pod, 2, 4, steps=3)
  assert "[p1]" in log and "Process 1 of 2; 4 local of 8 devices." in log
  _one_host(host, steps=3)
  a, b = _losses(pod), _losses(host)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=LOSS_RTOL)

  # Each layout resumes the other's checkpoint (state, EMA and data position) for 2 more steps.
  pod_from_host, host_from_pod = str(tmp_path / "pod_from_host"), str(tmp_path / "host_from_pod")
  shutil.copytree(host, pod_from_host)
  shutil.copytree(pod, host_from_pod)
  _launch(pod_from_host, 2, 4, steps=5)
  _one_host(host_from_pod, steps=5)
  c, d = _losses(pod_from_host), _losses(host_from_pod)
  assert sorted(c) == sorted(d) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([c[s] for s in (4, 5)], [d[s] for s in (4, 5)], rtol=LOSS_RTOL)


def test_sigterm_on_a_pod_stops_every_process_at_the_same_saved_step(tmp_path):
  workdir = str(tmp_path / "pod")
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    "--num_processes=2",
    "--devices_per_process=4",
    "--",
    *TINY,
    f"--workdir={workdir}",
    "--config.train.num_steps=1000",
    "--config.train.checkpoint_every=500",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)  # The launcher passes it to both processes.
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = {
    line.split("]")[0]: int(line.split("saved checkpoint ")[1].split()[0])
    for line in out.splitlines()
    if "Preempted (preemption notice, all processes): saved checkpoint" in line
  }
  assert set(saved) == {"[p0", "[p1"} and len(set(saved.values())) == 1, out[-3000:]
  step = saved["[p0"]
  assert 3 <= step < 500 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _gs_latents(url: str, count: int = 32, shard_size: int = 16, size: int = 8) -> None:
  """Random 8x8x4 latents with labels as encode_latents stores them in a bucket."""
  from dit_jax.data import latents, records

  rng = np.random.default_rng(0)
  latents.LatentsMetadata(
    vae="(random latents)",
    scaling_factor=0.18215,
    shift_factor=0.0,
    latent_channels=4,
    downsample_factor=8,
    image_size=size * 8,
    crop=latents.NO_CROP,
    flip=False,
    std=True,
    count=count,
    source="random",
    source_path="",
    source_split="train",
    dtype="float32",
    compute_dtype="float32",
    batch_size=shard_size,
    has_labels=True,
    format=records.FORMAT,
    shard_size=shard_size,
  ).save(url)
  n = records.num_shards(count, shard_size)
  for i in range(n):
    rows = min(shard_size, count - i * shard_size)
    shape = (rows, size, size, 4)
    storage.save_npy(
      storage.join(url, records.shard_name("labels", i, n)),
      rng.integers(0, 10, rows).astype(np.int32),
    )
    records.write_shard(
      storage.join(url, records.shard_name("latents", i, n)),
      {
        "latent": rng.standard_normal(shape).astype(np.float32),
        "latent_std": rng.uniform(0.01, 0.1, shape).astype(np.float32),
      },
    )


def test_a_pod_trains_on_gs_latents_into_a_gs_workdir_from_empty_directories(gcs, tmp_path):
  """2 processes x 4 devices, each started in its own empty directory, train on ArrayRecord
  latents in the bucket (each process reading its rows of every global batch) into a gs://
  workdir: the losses of 1 process x 8 devices on the same data, a checkpoint that restores onto
  1 device, and nothing written to either directory."""
  from dit_jax.evaluation import runner
  from dit_jax.train import setup

  data_url, workdir = gcs.url("latents"), gcs.url("pod")
  _gs_latents(data_url)
  fields = {
    "data.name": "latents",
    "data.path": data_url,
    "data.image_size": 8,
    "data.channels": 4,
    "data.latent_scale": 0.18215,
    "train.num_steps": 2,
    "train.log_every": 1,
  }
  args = [a.replace("configs/", os.path.join(REPO, "configs/")) for a in _cli.TINY]
  args += [f"--config.{k}={v}" for k, v in fields.items()]
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cwds = [tmp_path / f"p{i}" for i in range(2)]
  procs = []
  for i, cwd in enumerate(cwds):
    cwd.mkdir()
    cmd = [sys.executable, "-m", "dit_jax.main", *args, f"--workdir={workdir}"]
    cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(
      subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert [os.listdir(cwd) for cwd in cwds] == [[], []]
  pod = {}
  for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines():
    row = json.loads(line)
    pod[row["step"]] = row["loss"]
  # The reference: 1 process x 8 devices (this one) on the same data in the bucket.
  config = _cli.tiny_config(**{k.replace(".", "__"): v for k, v in fields.items()})
  host = str(tmp_path / "host")
  loop.run(config, host)
  want = _losses(host)
  assert sorted(pod) == sorted(want) == [1, 2]
  np.testing.assert_allclose([pod[s] for s in want], [want[s] for s in want], rtol=LOSS_RTOL)
  # The pod's checkpoint, with the config saved in it, restores onto 1 device.
  saved = runner.run_config(workdir)
  assert saved.data.path == data_url
  exp = setup.build(saved, devices=jax.devices()[:1], training=False)
  params, step = runner.restore_params(exp, workdir)
  assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


def _free_port() -> int:
  import portpicker

  return portpicker.pick_unused_port()
