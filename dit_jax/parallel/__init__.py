"""Device meshes and the logical-to-mesh axis rules: the only package that names mesh axes."""

import math

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
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
  """The preset's logical-to-mesh rules with `config.parallel.rules` overrides applied."""
  check_choice(config.parallel.preset, PRESETS, "parallel.preset")
  rules = dict(PRESETS[config.parallel.preset])
  for name, value in config.parallel.rules.items():
    if value == "preset":
      continue
    if value == "none":
      rules.pop(name, None)
      continue
    targets = tuple(a.strip() for a in value.split(","))
    unknown = [a for a in targets if a not in MESH_AXES]
    if unknown or len(set(targets)) != len(targets):
      raise ConfigError(
        f"config.parallel.rules.{name}={value!r}: expected 'preset', 'none' or distinct mesh "
        f"axes from {MESH_AXES} joined by ','."
      )
    rules[name] = targets[0] if len(targets) == 1 else targets
  return tuple(rules.items())


def _named(sizes) -> dict[str, int]:
  return dict(zip(MESH_AXES, sizes, strict=True))


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Per-slice sizes of (data, fsdp, tensor) for `num_devices` devices in each slice; one -1
  entry takes the remaining devices."""
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


def dcn_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  sizes = tuple(int(config.parallel.dcn_mesh[a]) for a in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ConfigError(f"config.parallel.dcn_mesh={_named(sizes)}: every size must be >= 1.")
  return sizes


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out for the interconnect.

  With `config.parallel.dcn_mesh` sizes > 1 the devices form slices (multi-slice TPU) and each
  mesh axis is dcn x ici long; otherwise one slice of `config.parallel.mesh` shape.
  """
  devices = jax.devices() if devices is None else list(devices)
  dcn = dcn_shape(config)
  slices = math.prod(dcn)
  if len(devices) % slices:
    raise ConfigError(
      f"config.parallel.dcn_mesh={_named(dcn)} asks for {slices} slices, which does not divide "
      f"the {len(devices)} devices."
    )
  ici = mesh_shape(config, len(devices) // slices)
  if slices == 1:
    try:
      array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):
      array = np.asarray(devices).reshape(ici)  # Topologies mesh_utils does not know.
  else:
    if not hasattr(devices[0], "slice_index"):
      raise ConfigError(
        f"config.parallel.dcn_mesh={_named(dcn)} needs multi-slice devices (TPU slices joined "
        "by DCN); these devices have no slice index. Set every dcn_mesh size to 1."
      )
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return Mesh(array, MESH_AXES)


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
