"""Device meshes and the logical-to-mesh axis rules: the only package that names mesh axes."""

import math

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import axes
from dit_jax.errors import ConfigError, check_choice

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # The batch is split over both.

# Logical axis -> mesh axes, by preset. Unlisted logical axes are replicated.
PRESETS = {
  "dp": [(axes.BATCH, DATA_AXES)],
  "fsdp": [(axes.BATCH, DATA_AXES), (axes.EMBED, "fsdp")],
  "fsdp_tp": [
    (axes.BATCH, DATA_AXES),
    (axes.EMBED, "fsdp"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
  ],
}


def axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
  check_choice(config.parallel.preset, PRESETS, "parallel.preset")
  return tuple(PRESETS[config.parallel.preset])


def _named(sizes) -> dict[str, int]:
  return dict(zip(MESH_AXES, sizes, strict=True))


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one -1 entry takes the remaining devices."""
  sizes = [int(config.parallel.mesh[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"Only one of config.parallel.mesh.{{{','.join(MESH_AXES)}}} may be -1.")
  fixed = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
    raise ConfigError(
      f"config.parallel.mesh={_named(sizes)} does not fit {num_devices} devices: "
      "the sizes must be positive (or -1) and their product must divide the device count."
    )
  sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"config.parallel.mesh={_named(sizes)} uses {math.prod(sizes)} devices but "
      f"{num_devices} are present; set one axis to -1 to use all of them."
    )
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  n = data_parallel_size(mesh)
  procs = jax.process_count()
  if batch_size <= 0 or batch_size % n or batch_size % procs:
    raise ConfigError(
      f"config.{field}={batch_size} must be a positive multiple of the {n} data-parallel "
      f"devices (mesh data x fsdp) and of the {procs} processes; try "
      f"{max(n, procs) * max(1, batch_size // max(n, procs))}."
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree whose leaves may carry logical axis metadata (nn.Partitioned)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch `jax.Array`s from each process's local rows."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )
