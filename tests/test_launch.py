"""The pod and GPU launch scripts: the commands they would run (gcloud is not called)."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_pod(*args, **env):
  full_env = dict(os.environ, TPU_NAME="dit-test", ZONE="us-east5-a", DRY_RUN="1", **env)
  return subprocess.run(
    ["bash", "launch/tpu_pod.sh", *args], cwd=REPO, env=full_env, capture_output=True, text=True
  )


def test_tpu_pod_run_starts_main_on_every_worker_with_the_arguments_intact():
  out = _tpu_pod("run", "--config=configs/dit_imagenet256.py:variant=XL/2", "--workdir=gs://b/x y")
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit-test"]
  assert "--worker=all" in argv and "--zone=us-east5-a" in argv
  remote = shlex.split(next(a for a in argv if a.startswith("--command=")).split("=", 1)[1])
  main = remote.index("dit_jax.main")
  assert remote[main + 1 : main + 3] == [
    "--config=configs/dit_imagenet256.py:variant=XL/2",
    "--workdir=gs://b/x y",
  ]


def test_tpu_pod_create_uses_the_accelerator_type_and_spot():
  out = _tpu_pod("create", ACCELERATOR="v5p-32", SPOT="1", PROJECT="p")
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert {"--accelerator-type=v5p-32", "--spot", "--project=p"} <= set(argv)


def test_tpu_pod_without_a_name_or_command_says_what_is_missing():
  out = subprocess.run(
    ["bash", "launch/tpu_pod.sh", "run"],
    cwd=REPO,
    env={k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")},
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0 and "set TPU_NAME" in out.stderr
  usage = _tpu_pod("frobnicate")
  assert usage.returncode == 2 and "launch/tpu_pod.sh create" in usage.stdout


def test_gpu_host_refuses_to_start_without_a_gpu():
  if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
    pytest.skip("a GPU is visible: the script would start a real run")
  out = subprocess.run(
    ["bash", "launch/gpu_host.sh", "--config=configs/quickstart.py", "--workdir=/tmp/unused"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 1 and "no NVIDIA GPU visible" in out.stderr


def test_tpu_pod_setup_makes_a_python_311_venv_with_uv_and_the_gcs_extra():
  for env, python in (({}, "3.11"), ({"PYTHON": "3.12"}, "3.12")):
    out = _tpu_pod("setup", **env)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert "--worker=all" in argv
    remote = next(a for a in argv if a.startswith("--command=")).split("=", 1)[1]
    assert f"uv venv --python '{python}' .venv" in remote, remote
    assert "uv pip install -q --python .venv/bin/python -e '.[tpu,gcs]'" in remote, remote
    assert "command -v uv" in remote and "set -e" in remote  # uv first, and stop on a failure.
