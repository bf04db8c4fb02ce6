"""Joining the processes of a multi-host job (TPU pod, GPU cluster, or local test processes).

Call `initialize` once, before anything touches a JAX device.
"""

import os

import jax
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
