"""Damaged checkpoints through the command line: one warning line per damaged checkpoint, the last
line ours, and none of the tracebacks a failed Orbax read used to leave behind."""

import asyncio
import glob
import os
import re
import threading
import time

import _cli
import pytest
from orbax.checkpoint._src import asyncio_utils

from dit_jax import checkpoint

pytestmark = pytest.mark.multiprocess

# A logged warning or error line (absl's format), e.g. "W1130 23:57:52.247893 1399 x.py:193] ...".
_LOGGED_WARNING = re.compile(r"^[WEF]\d{4} ", re.MULTILINE)


def _damage(workdir: str, *steps: int) -> None:
  """Cuts every array file of the checkpoints' train state to half its length."""
  for step in steps:
    pattern = os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*")
    paths = glob.glob(pattern, recursive=True)
    assert paths, pattern
    for path in paths:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _warnings(proc) -> list[str]:
  return [line for line in proc.output.splitlines() if _LOGGED_WARNING.match(line)]


def _assert_no_read_only_notice(proc) -> None:
  assert not re.search(r"read[ _-]only", proc.output, re.IGNORECASE), proc.output[-3000:]


def test_a_failed_read_lets_the_reads_it_started_finish(monkeypatch):
  """As tensorstore does, a read still in flight when another fails posts its result to its event
  loop from another thread; the loop must still be open then."""
  thread_errors = []
  monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))

  async def restore():
    loop = asyncio.get_running_loop()

    async def read_in_flight():
      done = loop.create_future()
      threading.Timer(0.2, loop.call_soon_threadsafe, (done.set_result, None)).start()
      await done

    async def read_damaged():
      raise ValueError("damaged")

    await asyncio.gather(read_in_flight(), read_damaged())

  original = asyncio_utils._run_sync_via_new_loop
  with checkpoint.settled_failed_reads(), pytest.raises(ValueError, match="damaged"):
    asyncio_utils.run_sync(restore())
  assert asyncio_utils._run_sync_via_new_loop is original
  time.sleep(0.4)  # The read has finished by now, in either case.
  assert thread_errors == []


def test_all_checkpoints_damaged_is_one_error_line_and_nothing_moves(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 2, 4, 6)
  before = _cli.snapshot(workdir)
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=train")
  _cli.assert_clear_error(proc, "None of the 3 checkpoint", "Not starting from scratch")
  _cli.assert_quiet(proc)
  warnings = _warnings(proc)
  assert len(warnings) == 3 and all("cannot be restored" in w for w in warnings), warnings
  assert _cli.snapshot(workdir) == before  # Left as they were, to be repaired.


def test_train_skips_a_damaged_newest_checkpoint_with_one_warning(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 6)
  damaged = _cli.snapshot(os.path.join(workdir, "checkpoints", "6"))
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=train", "--config.train.num_steps=8")
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  warnings = _warnings(proc)
  assert len(warnings) == 1 and "Checkpoint 6 " in warnings[0], warnings
  assert "Restored checkpoint 4 " in proc.output
  # Moved aside with every file as it was; the run saved its own 6 and 8.
  (aside,) = glob.glob(os.path.join(workdir, "checkpoints", "6.damaged-*"))
  assert _cli.snapshot(aside) == damaged
  assert {"6", "8"} <= set(os.listdir(os.path.join(workdir, "checkpoints")))


def test_sample_skips_a_damaged_newest_checkpoint_quietly(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  _damage(workdir, 6)
  checkpoints = _cli.snapshot(os.path.join(workdir, "checkpoints"))
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=sample")
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  _assert_no_read_only_notice(proc)
  warnings = _warnings(proc)
  assert len(warnings) == 1 and "Checkpoint 6 " in warnings[0], warnings
  assert "Restored checkpoint 4 " in proc.output
  assert _cli.snapshot(os.path.join(workdir, "checkpoints")) == checkpoints  # Sampling only reads.


def test_evaluate_prints_no_library_warnings(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=evaluate")
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  _assert_no_read_only_notice(proc)
  assert _warnings(proc) == []
