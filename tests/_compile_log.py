"""The suite's compile-time log: every process (pytest's workers and the programs the tests start)
appends one JSON line per XLA compile to the file in DIT_JAX_TEST_COMPILE_LOG, naming the test
file it ran for (DIT_JAX_TEST_FILE); conftest.py sums them per file at the end of the run."""

import collections
import json
import os

ENV_LOG, ENV_FILE = "DIT_JAX_TEST_COMPILE_LOG", "DIT_JAX_TEST_FILE"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"


def listen(monitoring) -> None:
  """Registers the listeners on `jax._src.monitoring` (or `jax.monitoring`)."""
  path = os.environ.get(ENV_LOG)
  if not path:
    return

  def write(row: dict) -> None:
    row["file"] = os.environ.get(ENV_FILE, "?")
    # One short line per write with O_APPEND: processes may write at once.
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def on_duration(event: str, seconds: float, **_) -> None:
    if event == _COMPILE:
      write({"seconds": seconds})

  def on_event(event: str, **_) -> None:
    if event == _HIT:
      write({"hit": 1})

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_listener(on_event)


def summary(path: str) -> list[str]:
  """Lines of a table: compile seconds, compiles and persistent-cache hits per test file."""
  seconds, compiles, hits = collections.Counter(), collections.Counter(), collections.Counter()
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # A line cut short by a killed process.
        name = row.get("file", "?")
        if "seconds" in row:
          seconds[name] += row["seconds"]
          compiles[name] += 1
        hits[name] += row.get("hit", 0)
  total = sum(seconds.values())
  lines = [f"{'compile s':>10} {'compiles':>9} {'cache hits':>10}  test file"]
  for name, s in seconds.most_common():
    lines.append(f"{s:10.1f} {compiles[name]:9d} {hits[name]:10d}  {name}")
  lines.append(f"{total:10.1f} {sum(compiles.values()):9d} {sum(hits.values()):10d}  in all")
  return lines
