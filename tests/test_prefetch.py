"""The prefetcher hands out the source's batches in order, saves the consumed position, and
raises the source's errors at the batch that hit them."""

import time

import grain
import jax
import numpy as np
import pytest

from dit_jax import benchmark, checks
from dit_jax.config_defaults import base_config
from dit_jax.data import DataError
from dit_jax.data.prefetch import Prefetcher
from dit_jax.errors import ConfigError

_BATCHES = 8


class _Counted:
  """A grain iterator over 8 shuffled batches of 4 that counts its reads and can fail at one."""

  def __init__(self, fail_at: int | None = None):
    dataset = grain.MapDataset.range(4 * _BATCHES).seed(0).shuffle().batch(4)
    self.inner = iter(dataset.to_iter_dataset())
    self.reads, self.fail_at = 0, fail_at
    self.error = DataError("image 7 is corrupt")

  def __next__(self):
    if self.reads == self.fail_at:
      raise self.error
    batch = next(self.inner)
    self.reads += 1
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _wait_for_reads(source, count):
  """Until the thread has read `count` batches (a condition; the deadline only ends a hang)."""
  deadline = time.monotonic() + 60
  while source.reads < min(count, _BATCHES):
    assert time.monotonic() < deadline, f"the thread read {source.reads} batches, not {count}"
    time.sleep(0.01)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_in_order_and_state_of_the_consumed_ones(depth):
  plain, source = _Counted(), _Counted()
  ahead = Prefetcher(source, jax.device_put, depth)
  states = []
  for k in range(_BATCHES):
    want, got = next(plain), next(ahead)
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(got, want)
    _wait_for_reads(source, k + 1 + depth)  # The thread has read ahead of what was consumed...
    assert ahead.get_state() == plain.get_state()  # ...but the state is that of the consumed.
    states.append(ahead.get_state())
  with pytest.raises(StopIteration):
    next(ahead)
  ahead.close()
  # A new prefetcher set to the state after 3 batches goes on with the 4th.
  resumed = Prefetcher(_Counted(), jax.device_put, depth)
  resumed.set_state(states[2])
  again = _Counted()
  for _ in range(3):
    next(again)
  np.testing.assert_array_equal(next(resumed), next(again))
  if depth:  # Its thread has read ahead from the old position.
    with pytest.raises(ValueError, match="set_state after reading started"):
      resumed.set_state(states[0])
  resumed.close()


def test_an_error_of_the_source_is_raised_at_its_batch_in_the_main_thread():
  source = _Counted(fail_at=3)
  ahead = Prefetcher(source, jax.device_put, depth=2)
  ahead.start_prefetch()
  reference = _Counted()
  for _ in range(3):
    np.testing.assert_array_equal(next(ahead), next(reference))
  with pytest.raises(DataError) as raised:
    next(ahead)
  assert raised.value is source.error
  with pytest.raises(DataError):
    next(ahead)  # Again, not a hang.
  assert ahead.get_state() == reference.get_state()  # The position of the last good batch.
  ahead.close()
  assert not ahead._thread.is_alive()


def test_close_stops_a_thread_that_is_waiting_to_read_ahead():
  ahead = Prefetcher(_Counted(), jax.device_put, depth=1)
  next(ahead)
  ahead.close()
  assert not ahead._thread.is_alive()
  ahead.close()  # Idempotent.


def test_negative_depth_is_an_error():
  with pytest.raises(ValueError, match="depth=-1 must be >= 0"):
    Prefetcher(_Counted(), jax.device_put, depth=-1)
  config = base_config()
  config.data.prefetch = -1
  with pytest.raises(ConfigError, match=r"data.prefetch=-1 must be >= 0 \(0 = off\)"):
    checks.validate(config)


def test_input_benchmark_reads_the_training_batches():
  config = base_config()
  config.train.batch_size = 8
  r = benchmark.benchmark_input(config, steps=2, warmup=1)
  assert r["images_per_sec"] == pytest.approx(8 / r["seconds"])


@pytest.mark.integration  # Compiles a train step.
def test_loop_benchmark_times_both_paths():
  config = base_config()
  config.model.variant, config.train.batch_size = "tiny/4", 8
  r = benchmark.benchmark_loop(config, steps=1, warmup=0)
  assert 0 <= r["wait"] < r["loop"] and r["ratio"] == r["loop"] / r["step"]
