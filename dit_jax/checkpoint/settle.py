"""Reading a damaged checkpoint without a screen of tracebacks: Orbax's event-loop runner swapped,
while such reads run, for one that lets the reads in flight finish before the loop closes."""

import asyncio
import contextlib
from collections.abc import Iterator

# How long a failed read of a damaged checkpoint waits for its other array reads to finish.
_SETTLE_S = 60.0


def _run_settled(coro):
  """Runs an Orbax coroutine in a fresh event loop, as Orbax does, but if it fails, lets the tasks
  it started finish before the loop is closed."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  except Exception:
    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if left:
      done, _ = loop.run_until_complete(asyncio.wait(left, timeout=_SETTLE_S))
      for task in done:  # Their errors repeat the one raised; retrieved, asyncio logs none.
        if not task.cancelled():
          task.exception()
    raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


@contextlib.contextmanager
def settled_failed_reads() -> Iterator[None]:
  """While checkpoints that may be damaged are read: a failed read leaves no reads in flight.

  Orbax runs each restore in a new event loop and closes it as soon as one array read fails, with
  the reads of the other arrays still in flight. Each of those, when it finishes, has tensorstore
  post its result to the closed loop from one of its threads, which prints a "RuntimeError: Event
  loop is closed" traceback: up to hundreds per damaged checkpoint, some after the program's last
  line. Orbax has no option for this, so its private runner is swapped for `_run_settled`
  meanwhile (if it still has one).
  """
  from orbax.checkpoint._src import asyncio_utils

  original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
  if original is None:
    yield
    return
  asyncio_utils._run_sync_via_new_loop = _run_settled
  try:
    yield
  finally:
    asyncio_utils._run_sync_via_new_loop = original
