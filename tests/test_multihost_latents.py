"""encode_latents as a pod on this machine: 2 processes x 4 CPU devices (launch.local, gloo) must
write the same bytes as 1 process x 8 devices, resume a killed run, and stop every process
together on an error."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.models import autoencoder
from dit_jax.tools import encode_latents as el

pytestmark = [pytest.mark.multiprocess, pytest.mark.sharding]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VAE_CONFIG = autoencoder.AutoencoderConfig(
  block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8
)
_COUNTS = {"cat": 11, "dog": 10}  # 21 images: chunks of 8, 8, 5.
_BATCH = 8
_TIMEOUT = 180


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A tiny random VAE, one whose scale overflows float16, and a folder of odd-sized images."""
  root = tmp_path_factory.mktemp("inputs")
  vae, big = str(root / "vae"), str(root / "vae_big")
  autoencoder.save_diffusers(vae, _VAE_CONFIG, autoencoder.random_params(_VAE_CONFIG, seed=0))
  shutil.copytree(vae, big)
  with open(os.path.join(big, autoencoder.CONFIG_FILE)) as f:
    config = json.load(f)
  config["scaling_factor"] = 1e7  # Latents of order 1e6: not finite as float16.
  with open(os.path.join(big, autoencoder.CONFIG_FILE), "w") as f:
    json.dump(config, f)
  rng = np.random.default_rng(0)
  for name, count in _COUNTS.items():
    (root / "images" / name).mkdir(parents=True)
    for i in range(count):
      w, h = rng.integers(9, 50, 2)
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
  return {"vae": vae, "vae_big": big, "images": str(root / "images")}


def _args(inputs, out, vae="vae", dtype="float32"):
  return [
    "--config=configs/quickstart.py",
    "--config.data.name=latents",
    "--config.data.image_size=4",  # 8x8 images -> 4x4x4 latents.
    "--config.data.channels=4",
    "--source=folder",
    f"--source_path={inputs['images']}",
    f"--vae={inputs[vae]}",
    f"--out={out}",
    "--flip",
    "--std",
    f"--batch_size={_BATCH}",
    f"--dtype={dtype}",
  ]


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _module(*args):
  return [sys.executable, "-m", "dit_jax.tools.encode_latents", *args]


def _pod(args):
  """Runs the tool through launch.local as 2 processes x 4 devices; returns its output."""
  cmd = [sys.executable, "-m", "launch.local", "--module=dit_jax.tools.encode_latents"]
  cmd += ["--num_processes=2", "--devices_per_process=4", "--", *args]
  out = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=_TIMEOUT)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-3000:]
  assert "Process 1 of 2; 4 local of 8 devices." in log
  for bad in ("Traceback", "Error", "Fatal", "Warning"):
    assert bad not in log, log[-3000:]
  return log


def _lines(log, process):
  prefix = f"[p{process}] "
  return [line[len(prefix) :] for line in log.splitlines() if line.startswith(prefix)]


def _bytes(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = f.read()
  return out


def _assert_same_files(got, want):
  got, want = _bytes(got), _bytes(want)
  assert (
    sorted(got)
    == sorted(want)
    == sorted(
      [
        "labels.npy",
        "latents.json",
        "latents.npy",
        "latents_flip.npy",
        "latents_flip_std.npy",
        "latents_std.npy",
        "progress.json",
      ]
    )
  )
  for name, value in want.items():
    assert got[name] == value, name


@pytest.fixture(scope="module")
def host(inputs, tmp_path_factory):
  """The reference: the tool as 1 process x 8 devices."""
  out = str(tmp_path_factory.mktemp("host") / "latents")
  run = subprocess.run(
    _module(*_args(inputs, out)),
    cwd=REPO,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=_TIMEOUT,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert f"{out}: {{'vae': " in last and "'count': 21" in last, run.stderr[-3000:]
  assert "Traceback" not in run.stderr and "Warning" not in run.stderr
  assert np.load(os.path.join(out, "latents_flip.npy")).shape == (21, 4, 4, 4)
  return out


def test_pod_writes_the_bytes_of_one_process(inputs, host, tmp_path):
  out = str(tmp_path / "latents")
  log = _pod(_args(inputs, out))
  _assert_same_files(out, host)
  p0, p1 = _lines(log, 0), _lines(log, 1)
  assert f"{out}: {{'vae': " in p0[-1]  # The tool's last word, from process 0 only.
  assert any("Wrote 21 latents" in line for line in p0)
  assert not any("Wrote" in line or f"{out}: {{" in line for line in p1)


def test_pod_resumes_a_killed_run_to_the_bytes_of_one_process(inputs, host, tmp_path):
  # What a run killed after its first chunk leaves: 8 rows done, the rest of the arrays not
  # written yet (here garbage, which the rerun must overwrite).
  out = str(tmp_path / "latents")
  shutil.copytree(host, out)
  for name in os.listdir(out):
    if name.endswith(".npy"):
      array = np.load(os.path.join(out, name), mmap_mode="r+")
      array[_BATCH:] = -7
      array.flush()
      del array
  with open(os.path.join(out, "progress.json"), "w") as f:
    json.dump({"rows": _BATCH}, f)
  log = _pod(_args(inputs, out))
  assert any(": 13 encoded in" in line for line in _lines(log, 0)), log[-3000:]
  _assert_same_files(out, host)


def test_pod_stops_every_process_on_latents_float16_cannot_hold(inputs, tmp_path):
  # The processes are started directly: launch.local would stop the survivors of a failed
  # process itself and hide a process that waits forever for process 0.
  out = str(tmp_path / "latents")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = _args(inputs, out, vae="vae_big", dtype="float16")
  procs = [
    subprocess.Popen(
      _module(
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    logs = [p.communicate(timeout=_TIMEOUT)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  want = (
    "Error: The latents.npy values of images 0..7 are not finite in float16 storage; rerun "
    "with --dtype=float32."
  )
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 1, log[-3000:]
    assert log.strip().splitlines()[-1] == want, log[-3000:]
    assert "Traceback" not in log and "Warning" not in log, log[-3000:]
  with open(os.path.join(out, "progress.json")) as f:
    assert json.load(f) == {"rows": 0}


def test_unwritable_out_is_a_config_error(inputs, tmp_path):
  config = base_config()
  config.data.update(name="latents", image_size=4, channels=4)
  (tmp_path / "file").write_text("not a directory")
  out = str(tmp_path / "file" / "latents")
  with pytest.raises(ConfigError, match=r"Cannot write into --out=.* choose a writable"):
    el.encode_latents(config, inputs["vae"], out, source="folder", source_path=inputs["images"])
  assert (tmp_path / "file").read_text() == "not a directory"
