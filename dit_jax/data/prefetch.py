"""Global batches assembled on the devices ahead of the step that reads them.

A background thread reads this process's next local batches from the grain iterator and places
them on the devices (`place`, e.g. `parallel.global_batch`), so that the transfer overlaps the
running step. The iterator runs ahead of training; the position that a checkpoint saves must be
that of the last batch the step consumed, so the thread records the iterator's state after each
batch and `Prefetcher.get_state` returns the one of the batch handed out last.
"""

import copy
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
from absl import logging

# How often blocked waits look at the stop flag, and how long `close` waits for the thread.
_POLL_S = 0.1
_JOIN_S = 30.0


class _Failure:
  """An exception raised in the thread, handed to the consumer in its batch's place."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()  # The source is exhausted.


def _produce(
  source: Iterator,
  place: Callable[[Any], Any],
  ready: queue.SimpleQueue,
  slots: threading.Semaphore,
  stop: threading.Event,
) -> None:
  """The thread's body: fills `ready` with (batch, state after it) while `slots` allow.

  It holds no reference to the Prefetcher, so that dropping one stops its thread (through
  `__del__`)."""
  try:
    while True:
      while not slots.acquire(timeout=_POLL_S):
        if stop.is_set():
          return
      if stop.is_set():
        return
      local = next(source)
      state = copy.deepcopy(source.get_state())
      batch = jax.block_until_ready(place(local))
      ready.put((batch, state))
  except StopIteration:
    ready.put(_END)
  except BaseException as error:  # Any error, re-raised by the consumer at that batch.
    ready.put(_Failure(error))


class Prefetcher(grain.DatasetIterator):
  """Iterates over `place(batch)` for the batches of `source`, up to `depth` of them made ahead.

  Checkpoint it instead of `source`: `get_state` is the position after the last batch that
  `next` returned (not the position the thread has read to), and `set_state` (before the first
  `next` or `start_prefetch`) restores one, so a resumed run reads the same batches. An error
  raised while reading or placing a batch is raised by the `next` call that would have returned
  that batch, as the same exception. Call `close` (idempotent) to stop the thread; it also closes
  `source`.

  Attributes:
    depth: batches assembled ahead of the one in use; 0 reads each batch in `next`, no thread.
  """

  def __init__(self, source: grain.DatasetIterator, place: Callable[[Any], Any], depth: int):
    """`source` needs `next`, `get_state` and `set_state`; `place` turns one of its batches into
    what `next` returns (e.g. device arrays)."""
    if depth < 0:
      raise ValueError(f"Prefetch depth={depth} must be >= 0 (0 = no prefetch).")
    super().__init__()
    self.depth = depth
    self._source, self._place = source, place
    self._ready = queue.SimpleQueue()
    self._slots = threading.Semaphore(depth)
    self._stop = threading.Event()
    self._thread = None
    self._state = None  # The position after the last batch handed out, once the thread runs.
    self._last = None  # _END or a _Failure, handed out again by every later `next`.

  def start_prefetch(self) -> None:
    """Starts reading ahead (else the first `next` does); idempotent."""
    if self.depth == 0 or self._thread is not None:
      return
    if self._closed:
      raise ValueError("This Prefetcher was closed; it cannot start again.")
    self._state = copy.deepcopy(self._source.get_state())
    self._thread = threading.Thread(
      target=_produce,
      args=(self._source, self._place, self._ready, self._slots, self._stop),
      name="dit_jax-prefetch",
      daemon=True,  # A read that never returns must not keep the process alive.
    )
    self._thread.start()

  def __next__(self) -> Any:
    if self.depth == 0:
      return self._place(next(self._source))
    if self._last is None:
      self.start_prefetch()
      item = self._take()
      if isinstance(item, tuple):
        batch, self._state = item
        self._slots.release()
        return batch
      self._last = item
    if self._last is _END:
      raise StopIteration
    raise self._last.error

  def _take(self) -> Any:
    while True:
      try:
        return self._ready.get(timeout=_POLL_S)
      except queue.Empty:
        if not self._thread.is_alive() and self._ready.empty():
          raise RuntimeError("The prefetch thread stopped without a batch or an error.") from None

  def get_state(self) -> dict[str, Any]:
    if self._thread is None:
      return self._source.get_state()
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    if self._thread is not None:
      raise ValueError(
        "Prefetcher.set_state after reading started: the thread has read ahead from the old "
        "position; set the state before the first next() or start_prefetch()."
      )
    self._source.set_state(state)

  def close(self) -> None:
    """Stops the thread (waiting for the batch it is reading), drops the batches made ahead and
    closes the source."""
    if getattr(self, "_closed", True):  # Closed, or __init__ raised (then __del__ calls this).
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(_JOIN_S)
      if self._thread.is_alive():
        # Closing the source under a read in progress would be unsafe; the daemon thread ends
        # with the process.
        logging.warning("The input prefetch thread did not stop within %.0f s.", _JOIN_S)
        self._closed = True
        return
      while not self._ready.empty():
        self._ready.get()
    if hasattr(self._source, "close"):
      self._source.close()
    super().close()
