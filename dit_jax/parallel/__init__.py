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


DEFAULT_MESH = (-1, 1, 1)  # config.parallel.mesh as config_defaults sets it.


def _split_axes(rules) -> dict[str, list[str]]:
  """{mesh axis: the logical axes other than the batch that `rules` split over it}."""
  out = {a: [] for a in MESH_AXES}
  for logical, targets in rules:
    for target in (targets,) if isinstance(targets, str) else tuple(targets or ()):
      if logical != axes.BATCH:
        out[target].append(logical)
  return out


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Per-slice sizes of (data, fsdp, tensor) for `num_devices` devices in each slice; one -1
  entry takes the remaining devices.

  The default mesh (data=-1, fsdp=1, tensor=1) under rules that split parameters over fsdp
  (presets fsdp and fsdp_tp) becomes data=1, fsdp=-1: otherwise `preset=fsdp` alone would be
  data parallelism, with every device holding the whole state.
  """
  sizes = [int(config.parallel.mesh[a]) for a in MESH_AXES]
  if tuple(sizes) == DEFAULT_MESH and _split_axes(axis_rules(config))["fsdp"]:
    sizes = [1, -1, 1]
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


def num_slices(devices) -> int:
  """How many TPU slices (joined by DCN) `devices` span; 1 off TPU (GPU hosts and CPU
  processes are not slices: their meshes are set by config.parallel.mesh alone)."""
  return len({getattr(d, "slice_index", 0) if d.platform == "tpu" else 0 for d in devices})


def dcn_shape(config: ml_collections.ConfigDict, devices) -> tuple[int, ...]:
  """`config.parallel.dcn_mesh` with its -1 (at most one; the default, on data) resolved to the
  slices of `devices` left over by the other sizes."""
  sizes = [int(config.parallel.dcn_mesh[a]) for a in MESH_AXES]
  if any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(
      f"config.parallel.dcn_mesh={_named(tuple(sizes))}: every size must be >= 1, or -1 (at most "
      "one) for the slices left over."
    )
  if -1 in sizes:
    fixed = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = max(1, num_slices(devices) // fixed)
  return tuple(sizes)


def default_devices() -> list:
  """The devices a mesh spans where the caller names none: every device of the job.

  The one place that says so (the test suite narrows it to one device for tests that are not
  about sharding)."""
  return jax.devices()


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: `default_devices()`, all of them),
  laid out for the interconnect.

  With `config.parallel.dcn_mesh` sizes > 1 the devices form slices (multi-slice TPU) and each
  mesh axis is dcn x ici long; otherwise one slice of `config.parallel.mesh` shape. By default
  (dcn_mesh.data=-1) data parallelism spans all the slices there are.
  """
  devices = default_devices() if devices is None else list(devices)
  dcn = dcn_shape(config, devices)
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


def layout_warnings(config: ml_collections.ConfigDict, mesh: Mesh) -> list[str]:
  """Sentences (empty if none) on mesh axes that the rules leave idle: an axis the rules split
  parameters over but of size 1, so nothing is split (e.g. preset fsdp_tp with mesh.tensor=1),
  or an axis of size > 1 that no rule names, so its devices repeat each other's work."""
  if mesh.size == 1:
    return []
  rules = axis_rules(config)
  split = _split_axes(rules)
  named = {a for _, t in rules for a in ((t,) if isinstance(t, str) else tuple(t or ()))}
  preset, shape = config.parallel.preset, dict(mesh.shape)
  out = []
  for a in MESH_AXES:
    if split[a] and mesh.shape[a] == 1:
      out.append(
        f"config.parallel.preset={preset} splits the {', '.join(split[a])} dimensions over the "
        f"mesh axis {a!r}, which has size 1 in the mesh {shape}, so they are not split; set "
        f"--config.parallel.mesh.{a} to a size that divides them (and another axis to -1)."
      )
    if a not in named and mesh.shape[a] > 1:
      out.append(
        f"The mesh {shape} gives the axis {a!r} {mesh.shape[a]} devices, but "
        f"config.parallel.preset={preset} splits nothing over it, so they repeat each other's "
        f"work; set --config.parallel.mesh.{a}=1 or choose a preset that uses it."
      )
  return out


def device_fraction(abstract_tree, device) -> float:
  """The fraction of the bytes of `abstract_tree` (shaped leaves carrying NamedShardings, such as
  `Experiment.abstract_state`) that `device` holds: 1 when all is replicated, 1/n when all is
  split n ways."""
  total = held = 0
  for x in jax.tree.leaves(abstract_tree):
    itemsize = np.dtype(x.dtype).itemsize
    total += math.prod(x.shape) * itemsize
    index = x.sharding.devices_indices_map(x.shape)[device]
    held += math.prod(len(range(*s.indices(n))) for s, n in zip(index, x.shape, strict=True)) * (
      itemsize
    )
  return held / max(total, 1)


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


def from_host(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a host array that every process holds whole (each device takes its
  slice)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch `jax.Array`s from each process's local rows."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )
