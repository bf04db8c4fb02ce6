"""Runs a dit_jax command as N local processes with M fake CPU devices each: a pod on one machine.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/quickstart.py --workdir=workdirs/pod_test --config.train.num_steps=50

Everything after `--` goes to `python -m dit_jax.main`, or to another program of the package
that joins a job through the same flags, chosen with --module:

  python -m launch.local --module=dit_jax.tools.encode_latents -- --config=... --vae=... --out=...

The processes join through `jax.distributed` at 127.0.0.1 (gloo collectives on CPU), exactly as
the hosts of a pod slice do; process 0 writes logs, metrics and images, all of them write their
checkpoint shards. Each process's output is prefixed with `[p<i>]`; if one fails, the others
are stopped.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one).")
_MODULE = flags.DEFINE_string(
  "module",
  "dit_jax.main",
  "Program every process runs as `python -m MODULE`; it must take --coordinator_address, "
  "--num_processes and --process_id.",
)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _forward(prefix: str, stream, sink) -> None:
  for line in iter(stream.readline, ""):
    sink.write(f"{prefix} {line}")
    sink.flush()


def launch(
  main_args: list[str],
  num_processes: int,
  devices_per_process: int,
  port: int = 0,
  module: str = "dit_jax.main",
) -> list[int]:
  """Starts `python -m module main_args` as the processes, streams their output, waits; returns
  the exit codes."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be >= 1.")
  address = f"127.0.0.1:{port or free_port()}"
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(
    [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + [f"--xla_force_host_platform_device_count={devices_per_process}"]
  )
  procs, threads = [], []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", module, *main_args]
    if num_processes > 1:
      cmd += [
        f"--coordinator_address={address}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ]
    p = subprocess.Popen(
      cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    t = threading.Thread(target=_forward, args=(f"[p{i}]", p.stdout, sys.stdout), daemon=True)
    t.start()
    procs.append(p)
    threads.append(t)

  # SIGTERM / Ctrl-C reach every process, as a maintenance event reaches every host of a slice:
  # they save at a step they agree on and exit.
  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  # A process that fails leaves the others blocked in collectives: stop them too.
  while any(p.poll() is None for p in procs):
    if any(p.poll() for p in procs):
      for p in procs:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.2)
  codes = [p.returncode for p in procs]
  for t in threads:
    t.join()
  return codes


def main(argv):
  codes = launch(argv[1:], _NUM_PROCESSES.value, _DEVICES.value, _PORT.value, _MODULE.value)
  failed = [(i, c) for i, c in enumerate(codes) if c]
  if failed:
    sys.exit(f"launch.local: process(es) {failed} failed (index, exit code).")


if __name__ == "__main__":
  app.run(main)
