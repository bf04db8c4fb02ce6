"""Runs a dit_jax command as N local processes with M fake CPU devices each: a pod on one machine.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/quickstart.py --workdir=workdirs/pod_test --config.train.num_steps=50

Everything after `--` goes to `python -m dit_jax.main`, or to another program of the package
that joins a job through the same flags, chosen with --module:

  python -m launch.local --module=dit_jax.tools.encode_latents -- --config=... --vae=... --out=...

The processes join through `jax.distributed` at 127.0.0.1 (gloo collectives on CPU), exactly as
the hosts of a pod slice do; process 0 writes logs, metrics and images, all of them write their
checkpoint shards. Each process's output is prefixed with `[p<i>]` (without gloo's connection
messages); if one fails, the others are stopped.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from dit_jax import cli


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Gloo prints "[Gloo] Rank R is connected to N peer ranks. Expected number of connected peer
# ranks is : N" for every collective group (~16 per process). It writes the message in these
# pieces, from several threads at once, so a message can be split over two lines or glued to a
# progress bar.
_GLOO_PIECES = (
  r"\[Gloo\] Rank ",
  r"\d+",
  r" is connected to ",
  r"\d+",
  r" peer ranks\. ",
  r"Expected number of connected peer ranks is : ",
  r"\d+",
)
_GLOO_MESSAGE = re.compile("".join(_GLOO_PIECES))
# The start of a message at the end of a line, and the rest of one at the start of the next.
_GLOO_HEAD = re.compile("(?:" + "|".join("".join(_GLOO_PIECES[:k]) for k in range(1, 7)) + ")$")
_GLOO_TAIL = re.compile(r"^\s*(?:" + "|".join("".join(_GLOO_PIECES[k:]) for k in (2, 4, 5)) + ")")


def drop_gloo_messages(line: str) -> str | None:
  """`line` without gloo's connection messages (or pieces of them); None if nothing else is
  left of it."""
  kept = _GLOO_TAIL.sub("", _GLOO_HEAD.sub("", _GLOO_MESSAGE.sub("", line.rstrip("\n"))))
  if kept == line.rstrip("\n"):
    return line
  return f"{kept}\n" if kept.strip() else None


def _forward(prefix: str, stream, sink, last: list[str], index: int) -> None:
  """Copies `stream` to `sink` line by line with `prefix`; keeps its last line in last[index]."""
  for line in iter(stream.readline, ""):
    line = drop_gloo_messages(line)
    if line is not None:
      sink.write(f"{prefix} {line}")
      sink.flush()
      if line.strip():
        last[index] = line.strip()


def launch(
  main_args: list[str],
  num_processes: int,
  devices_per_process: int,
  port: int = 0,
  module: str = "dit_jax.main",
  last_lines: list[str] | None = None,
  grace_s: float = 10.0,
) -> list[int]:
  """Starts `python -m module main_args` as the processes, streams their output, waits; returns
  the exit codes (and fills `last_lines`, if given, with each process's last line of output).
  When one process fails, the others still running `grace_s` seconds later are terminated."""
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
  last = [""] * num_processes
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
    t = threading.Thread(
      target=_forward, args=(f"[p{i}]", p.stdout, sys.stdout, last, i), daemon=True
    )
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

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  # A process that fails leaves the others blocked in collectives: stop them too, after a grace
  # period in which those that fail on their own (a bad flag fails every process) end by themselves
  # and keep their own exit code.
  failed_at = None
  while any(p.poll() is None for p in procs):
    if failed_at is None and any(p.poll() for p in procs):
      failed_at = time.monotonic()
    if failed_at is not None and time.monotonic() - failed_at > grace_s:
      for p in procs:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.2)
  for s, handler in previous.items():
    signal.signal(s, handler)
  codes = [p.returncode for p in procs]
  for t in threads:
    t.join()
  if last_lines is not None:
    last_lines[:] = last
  return codes


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that importing the module defines none."""
  flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
  flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.", lower_bound=1)
  flags.DEFINE_integer(
    "port",
    0,
    "Coordinator port on 127.0.0.1 (0: pick a free one).",
    lower_bound=0,
    upper_bound=65535,
  )
  flags.DEFINE_string(
    "module",
    "dit_jax.main",
    "Program every process runs as `python -m MODULE`; it must take --coordinator_address, "
    "--num_processes and --process_id.",
  )


def main(argv):
  f = flags.FLAGS
  last: list[str] = []
  codes = launch(argv[1:], f.num_processes, f.devices_per_process, f.port, f.module, last)
  failed = ", ".join(f"p{i} exit code {c}" for i, c in enumerate(codes) if c)
  if failed:
    sys.exit(f"Error: launch.local: {failed}; {failure_cause(codes, last)}")


def failure_cause(codes: list[int], last: list[str]) -> str:
  """Where the failure of a launch shows: the last line of the process that failed on its own
  (its error line if it wrote one; the processes stopped after it exit with a signal's code)."""
  failed = [i for i, c in enumerate(codes) if c and last[i]]
  ranked = [i for i in failed if last[i].startswith("Error: ")] + [
    i for i in failed if codes[i] > 0
  ]
  if not ranked:
    return "the cause is in the [p<i>] lines above."
  i = ranked[0]
  return f"p{i} ended with: {last[i].removeprefix('Error: ')}"


if __name__ == "__main__":
  _define_flags()
  cli.run(main, positional=True)
