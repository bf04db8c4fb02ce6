"""Joining the processes of a multi-host job (TPU pod, GPU cluster, or local test processes).

Call `initialize` once, before anything touches a JAX device.
"""

import os
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from dit_jax.errors import ConfigError


def _auto_detectable() -> bool:
  """Whether a multi-process launcher JAX reads the layout from (TPU, SLURM, Open MPI) is here."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins this process to the job, or does nothing in a single-process run.

  With `coordinator_address` ("host:port" of process 0) all three arguments are required (GPU
  clusters without a scheduler JAX knows, and the local launcher). Without it, the layout is
  detected on multi-host TPU slices, SLURM and Open MPI; otherwise the run is single-process.
  On CPU the processes exchange collectives through gloo.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise ConfigError(
        "--num_processes/--process_id need --coordinator_address=<host:port of process 0>."
      )
    if not _auto_detectable():
      return
    jax.distributed.initialize()
  else:
    if None in explicit:
      raise ConfigError(
        "--coordinator_address needs --num_processes and --process_id as well (process 0 "
        "listens at the address; every process passes the same address and count)."
      )
    if not 0 <= process_id < num_processes:
      raise ConfigError(
        f"--process_id={process_id} is not in [0, --num_processes={num_processes})."
      )
    # Only the CPU backend reads this; GPUs and TPUs keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info(
    "Process %d of %d; %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def on_process_0(fn: Callable[[], int | None], task: str, fix: str) -> int:
  """Runs `fn` (work that writes files; it may return an int >= 0) on process 0 alone and returns
  its result (0 for None) on every process.

  If it fails with a ConfigError, or an OSError (turned into one: "Cannot <task> (<error>);
  <fix>"), every process raises: were process 0 to stop alone, the others would wait for it in
  their next collective until the distributed runtime gives up, minutes later.
  """
  value, error = 0, None
  if jax.process_index() == 0:
    try:
      value = fn() or 0
    except ConfigError as e:
      value, error = -1, e
    except OSError as e:
      value, error = -1, ConfigError(f"Cannot {task} ({e}); {fix}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    value = int(multihost_utils.broadcast_one_to_all(np.int64(value)))
  if error is not None:
    raise error
  if value < 0:
    raise ConfigError(f"Process 0 failed to {task}; its log says why.")
  return value
