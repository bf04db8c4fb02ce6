"""--mode=sample as a pod on this machine: 2 processes x 4 CPU devices (launch.local, gloo) must
write the decoded samples of 1 process x 8 devices bit for bit, also when killed after a chunk
and rerun, and all processes must stop together when process 0 cannot write."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dit_jax.models import autoencoder

pytestmark = [pytest.mark.multiprocess, pytest.mark.sharding]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 180
# The paper's latent setting shrunk (runlocal: tiny/2 on `synthetic` latents): eps with learned
# sigma, DDPM, 3 of 4 channels guided. DDPM draws noise at every step, so a chunk sampled with
# another start, key or padding would show. 14 images in chunks of 6 (each padded to the 8
# devices): [0, 6), [6, 12), [12, 14); 8x8x4 latents decoded to 16x16x3 images.
_MODEL = [
  "--config=configs/dit_imagenet256.py:variant=S/2,objective=eps,runlocal",
  "--config.data.image_size=8",
]
_TRAIN = [
  "--mode=train",
  "--config.train.num_steps=2",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=2",
]
NUM_IMAGES, CHUNK = 14, 6
_SAMPLE = [
  "--mode=sample",
  "--config.sample.num_steps=4",
  f"--config.sample.num_images={NUM_IMAGES}",
  f"--config.sample.batch_size={CHUNK}",
]
_VAE = autoencoder.AutoencoderConfig(
  block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4
)


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _start(cmd, env, **kwargs):
  # Its own process group, so that the launcher and its processes can be stopped together.
  return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **kwargs)


def _stop(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def _run(cmd, env):
  """Runs `cmd` to its end; returns its output. A process that hangs (waiting in a collective for
  another) fails the test after _TIMEOUT seconds, and none is left running."""
  proc = _start(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    log, _ = proc.communicate(timeout=_TIMEOUT)
  finally:
    _stop(proc)
  assert proc.returncode == 0, log[-3000:]
  return log


def _host(args):
  """`python -m dit_jax.main args` as 1 process x 8 devices; returns its log."""
  return _run([sys.executable, "-m", "dit_jax.main", *args], _env(8))


def _pod_cmd(args):
  cmd = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4"]
  return [*cmd, "--", *args]


def _pod(args):
  """The same as 2 processes x 4 devices; returns the launcher's log."""
  log = _run(_pod_cmd(args), _env(1))
  assert "Process 1 of 2; 4 local of 8 devices." in log
  for bad in ("Traceback", "Error", "Warning"):
    assert bad not in log, log[-3000:]
  return log


def _lines(log, process):
  return [line for line in log.splitlines() if line.startswith(f"[p{process}] ")]


def _samples(workdir, name):
  """The images and labels of samples/<name>.npz, after checking that the chunks are gone."""
  samples = os.path.join(workdir, "samples")
  assert not os.path.exists(os.path.join(samples, f"{name}.parts"))
  assert os.path.isfile(os.path.join(samples, f"{name}.png"))
  with np.load(os.path.join(samples, f"{name}.npz")) as f:
    assert sorted(f.files) == ["arr_0", "labels"]
    return f["arr_0"], f["labels"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(sample args, the images and labels they write on 1 process x 8 devices): a tiny latent DiT
  trained 2 steps and a random VAE to decode its samples."""
  root = tmp_path_factory.mktemp("sampling")
  workdir, vae = str(root / "run"), str(root / "vae")
  autoencoder.save_diffusers(vae, _VAE, autoencoder.random_params(_VAE, seed=0))
  _host([*_MODEL, *_TRAIN, f"--workdir={workdir}"])
  args = [*_MODEL, *_SAMPLE, f"--workdir={workdir}", f"--config.vae.path={vae}"]
  _host([*args, "--config.sample.name=host"])
  images, labels = _samples(workdir, "host")
  assert images.dtype == np.uint8 and images.shape == (NUM_IMAGES, 16, 16, 3)
  np.testing.assert_array_equal(labels, np.arange(NUM_IMAGES))  # Balanced over 1000 classes.
  assert len({image.tobytes() for image in images}) == NUM_IMAGES
  return args, workdir, images, labels


def test_pod_samples_the_images_of_one_process(run):
  args, workdir, images, labels = run
  log = _pod([*args, "--config.sample.name=pod"])
  got_images, got_labels = _samples(workdir, "pod")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert any(f"Wrote {NUM_IMAGES} samples" in line for line in _lines(log, 0))
  assert not any("Wrote" in line for line in _lines(log, 1))  # Process 0 alone writes.


def test_pod_killed_after_a_chunk_resumes_to_the_images_of_one_process(run):
  args, workdir, images, labels = run
  args = [*args, "--config.sample.name=killed"]
  parts = os.path.join(workdir, "samples", "killed.parts")
  proc = _start(_pod_cmd(args), _env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + _TIMEOUT
    while not (os.path.isdir(parts) and any(n.endswith(".npy") for n in os.listdir(parts))):
      assert proc.poll() is None and time.time() < deadline
      time.sleep(0.02)
  finally:
    _stop(proc)  # SIGKILL to the launcher and both processes, as a preempted slice.
  done = sorted(n for n in os.listdir(parts) if n.endswith(".npy"))
  assert done[0] == f"{0:08d}-{CHUNK:08d}.npy" and len(done) < -(-NUM_IMAGES // CHUNK), done
  assert not os.path.exists(os.path.join(workdir, "samples", "killed.npz"))
  log = _pod(args)
  resumed = f"Resuming: {CHUNK * len(done)} of {NUM_IMAGES} samples"
  assert any(resumed in line for line in _lines(log, 0)), log[-3000:]
  got_images, got_labels = _samples(workdir, "killed")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


def test_pod_stops_every_process_when_process_0_cannot_write(run):
  # The processes are started directly: launch.local would stop the survivors of a failed
  # process itself and hide a process that waits forever for process 0.
  args, workdir, _, _ = run
  args = [*args, "--config.sample.name=unwritable"]
  parts = os.path.join(workdir, "samples", "unwritable.parts")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
    _start(
      [sys.executable, "-m", "dit_jax.main", *args, f"--coordinator_address=127.0.0.1:{port}"]
      + ["--num_processes=2", f"--process_id={i}"],
      _env(4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    deadline = time.time() + _TIMEOUT
    while not (os.path.isdir(parts) and any(n.endswith(".npy") for n in os.listdir(parts))):
      assert all(p.poll() is None for p in procs) and time.time() < deadline
      time.sleep(0.02)
    # Process 0 cannot write the next chunk; process 1 must not wait for it in a collective.
    os.rename(parts, parts + ".away")
    with open(parts, "w") as f:
      f.write("not a directory")
    logs = [p.communicate(timeout=_TIMEOUT)[1] for p in procs]
  finally:
    for p in procs:
      _stop(p)
  want = [
    f"Error: Cannot write the samples into {parts} ([Errno 20] Not a directory",
    f"Error: Process 0 failed to write the samples into {parts}; its log says why.",
  ]
  for p, log, line in zip(procs, logs, want, strict=True):
    assert p.returncode == 1, log[-3000:]
    assert log.strip().splitlines()[-1].startswith(line), log[-3000:]
  assert not os.path.exists(os.path.join(workdir, "samples", "unwritable.npz"))
