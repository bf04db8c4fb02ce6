"""A pod on this machine: 2 processes x 4 CPU devices (jax.distributed over localhost, gloo) must
train like 1 process x 8 devices from a bucket into a bucket, each must restore the other's
checkpoints, and SIGTERM must stop all processes at one saved step."""

import json
import os
import signal
import subprocess
import sys
import time

import _cli
import _gcs
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


def _launch(workdir, processes, devices, steps, args=TINY, cwd=REPO):
  """launch.local's pod, started in `cwd`; returns its output."""
  cmd = [
    sys.executable,
    "-m",
    "launch.local",
    f"--num_processes={processes}",
    f"--devices_per_process={devices}",
    "--",
    *args,
    f"--workdir={workdir}",
    f"--config.train.num_steps={steps}",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])  # launch/, from `cwd`.
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _one_host(workdir, steps, **fields):
  """The reference: 1 process x 8 devices, this one (the test runs on all 8)."""
  assert jax.device_count() == len(parallel.default_devices()) == 8
  config = _cli.tiny_config(
    train__log_every=1, train__checkpoint_every=3, train__num_steps=steps, **fields
  )
  loop.run(config, workdir)


def _losses(workdir):
  rows = [
    json.loads(line)
    for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
  ]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), steps  # One line per step: process 0 alone writes.
  return {r["step"]: r["loss"] for r in rows}


def test_two_processes_train_like_one_and_share_checkpoints(gcs, tmp_path):
  """2 processes x 4 devices (launch.local, started in an empty directory) train on ArrayRecord
  latents in a bucket, each process reading its rows of every global batch, into a gs:// workdir:
  the losses of 1 process x 8 devices on the same data in a local workdir. Each layout resumes the
  other's checkpoint (state, EMA and data position, past the end of an epoch), the pod's checkpoint
  restores onto 1 device with the config saved in it, and nothing is written to the directory the
  processes run in."""
  from dit_jax import experiment
  from dit_jax.evaluation import runner

  data_url = gcs.url("latents")
  _gcs.write_latents(data_url)  # 32 examples: 4 global batches of 8 an epoch.
  fields = {
    "data.name": "latents",
    "data.path": data_url,
    "data.image_size": 8,
    "data.channels": 4,
    "data.latent_scale": 0.18215,
  }
  args = [a.replace("configs/", os.path.join(REPO, "configs/")) for a in TINY]
  args += [f"--config.{k}={v}" for k, v in fields.items()]
  fields = {k.replace(".", "__"): v for k, v in fields.items()}
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  pod, host = gcs.url("pod"), str(tmp_path / "host")
  log = _launch(pod, 2, 4, steps=3, args=args, cwd=cwd)
  assert "[p1]" in log and "Process 1 of 2; 4 local of 8 devices." in log
  _one_host(host, steps=3, **fields)
  a, b = _losses(pod), _losses(host)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=LOSS_RTOL)

  # Each layout resumes the other's checkpoint for 2 more steps (into the next epoch).
  pod_from_host = _gcs.upload(host, gcs.url("pod_from_host"))
  host_from_pod = _gcs.download(pod, str(tmp_path / "host_from_pod"))
  _launch(pod_from_host, 2, 4, steps=5, args=args, cwd=cwd)
  _one_host(host_from_pod, steps=5, **fields)
  c, d = _losses(pod_from_host), _losses(host_from_pod)
  assert sorted(c) == sorted(d) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([c[s] for s in (4, 5)], [d[s] for s in (4, 5)], rtol=LOSS_RTOL)
  assert os.listdir(cwd) == []

  # The pod's checkpoint, with the config saved in it, restores onto 1 device.
  saved = runner.run_config(pod_from_host)
  assert saved.data.path == data_url
  exp = experiment.build(saved, devices=jax.devices()[:1], training=False)
  params, step = runner.restore_params(exp, pod_from_host)
  assert step == 5 and all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


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
