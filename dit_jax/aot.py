"""Ahead-of-time compilation for TPU topologies: what `launch/aot_compile.py` runs.

libtpu describes a slice's devices without a TPU, and the train step built by the training
factories (`experiment.build` + `jit_train_step`) is lowered with abstract inputs and compiled
for them.
"""

import dataclasses
import math
import os
import re

import ml_collections

from dit_jax import utils

# Compiling needs no TPU, so several compiles (or a test run) may load libtpu side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # libtpu's topology prefix.
  hbm_bytes: int  # Per chip (one JAX device per chip: megacore on v4/v5p).
  dims: int  # 2D or 3D torus.
  cores_per_chip: int  # How the accelerator type counts: TensorCores (v4, v5p) or chips.
  peak_flops: float  # Per chip, bfloat16 dense matmul (the vendor's figure).
  chip_config: str = "default"


GENERATIONS = {
  "v4": Generation("v4", 32 * GiB, 3, 2, 275e12, "megacore"),
  "v5p": Generation("v5p", 95 * GiB, 3, 2, 459e12),
  "v5e": Generation("v5e", 16 * GiB, 2, 1, 197e12),
  "v5litepod": Generation("v5e", 16 * GiB, 2, 1, 197e12),
  "v6e": Generation("v6e", 32 * GiB, 2, 1, 918e12),
}


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU uses for `chips` chips: double the smallest (last) axis."""
  if chips & (chips - 1) or (dims == 3 and chips < 4):
    raise ValueError(f"no standard {dims}D slice has {chips} chips")
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(text: str) -> tuple[Generation, tuple[int, ...]]:
  """'v5p-32' or 'v5p:2x2x4' -> (generation, chip grid)."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", text.strip().lower())
  gen = GENERATIONS.get(m.group(1)) if m else None
  if gen is None:
    raise ValueError(
      f"--topology={text!r}: expected <generation>-<size> (v5p-32, v5e-16, v4-64) or "
      f"<generation>:<AxB[xC]> with a generation from {sorted(GENERATIONS)}."
    )
  if m.group(3):
    shape = tuple(int(s) for s in m.group(3).split("x"))
  else:
    size = int(m.group(2))
    if size % gen.cores_per_chip:
      raise ValueError(f"--topology={text!r}: {gen.name} sizes count TensorCores, 2 per chip.")
    try:
      shape = _default_shape(size // gen.cores_per_chip, gen.dims)
    except ValueError as e:
      raise ValueError(
        f"--topology={text!r}: {e}; give an explicit {gen.name}:AxB... name."
      ) from None
  return gen, shape


def _host_bounds(gen: Generation, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """Chips per host: 4 (2x2) on multi-host slices; single-host v5e/v6e slices hold up to 8."""
  shape3 = tuple(shape) + (1,) * (3 - len(shape))
  chips = math.prod(shape)
  if chips < 4:
    return shape3
  if gen.dims == 2 and chips == 8:
    return shape3
  return (2, 2, 1)


def topology_devices(gen: Generation, shape: tuple[int, ...], num_slices: int = 1):
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(
    platform="tpu",
    topology_name=f"{gen.name}:{'x'.join(map(str, shape))}",
    chip_config_name=gen.chip_config,
    chips_per_host_bounds=_host_bounds(gen, shape),
    num_slices=num_slices,
  )
  return topo.devices


def build(config, devices):
  """The experiment `config` describes over `devices` (the same factory training uses).

  Only shapes matter here, so a text model's data is replaced by synthetic text of the sizes the
  config states (model.context_len, context_dim, pooled_dim); no dataset needs to be on disk.
  """
  from dit_jax import data, experiment

  if data.wants_text(config) and config.data.name != "synthetic":
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.name = "synthetic"
  return experiment.build(config, devices=devices)


def compile_train_step(exp, size: tuple[int, int] | None = None):
  """The train step training would run, lowered with abstract inputs and compiled; for images of
  `size` = (height, width) (one bucket's program), by default the config's square size."""
  with exp.context():
    batch = exp.abstract_batch(size=size)
    return exp.jit_train_step().lower(exp.abstract_state, batch).compile()


def fit_hints(config: ml_collections.ConfigDict) -> str:
  """What could make `config` fit a slice it does not, leaving out what it already does."""
  hints = []
  if config.parallel.preset == "dp":
    hints.append("--config.parallel.preset=fsdp")
  if config.model.remat == "none":
    hints.append("--config.model.remat=full (or dots)")
  if config.model.dtype == "float32":
    hints.append("--config.model.dtype=bfloat16")
  return "try " + ", ".join(hints + ["a smaller global batch, or more chips"])


def out_of_memory_bytes(error: Exception) -> int | None:
  """The temporaries the TPU compiler asked for when it refused a program, or None."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", str(error))
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


@dataclasses.dataclass
class Report:
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  hbm: int
  flops: float  # XLA's estimate for one device's program.

  @property
  def total(self) -> int:
    """Peak per device: live inputs + outputs not aliased to (donated) inputs + scratch + code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm


def report(compiled, hbm: int) -> Report:
  mem = compiled.memory_analysis()
  return Report(
    arguments=mem.argument_size_in_bytes,
    outputs=mem.output_size_in_bytes,
    aliased=mem.alias_size_in_bytes,
    temporaries=mem.temp_size_in_bytes,
    code=mem.generated_code_size_in_bytes,
    hbm=hbm,
    flops=utils.xla_flops(compiled),
  )


def twin_config(config, batch_size: int | None = None):
  """The program the step's cost is read from: `config` with its blocks fully unrolled (XLA counts
  a loop body once) and XLA's attention (XLA cannot see inside a Pallas kernel), at global
  `batch_size` if given."""
  twin = utils.fully_unrolled(config)
  twin.model.attention = "xla"
  if batch_size:
    twin.train.batch_size = batch_size
  return twin


def roofline_seconds(compiled) -> float | None:
  """XLA's roofline time ("optimal_seconds") of one device's program, or None if it gives none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  seconds = float((cost or {}).get("optimal_seconds", 0.0))
  return seconds if seconds > 0 and math.isfinite(seconds) else None


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The compiler's view of one train step on one chip: estimates, not measurements."""

  flops: float  # XLA's count per device (multiply-add = 2), remat's recomputation included.
  seconds: float | None  # XLA's roofline time per device; None if it gives none.
  images: float  # Per chip per step.
  peak_flops: float  # The chip's bfloat16 peak.

  @property
  def mfu(self) -> float | None:
    """FLOPs over the roofline time, as a fraction of the chip's peak."""
    return self.flops / self.seconds / self.peak_flops if self.seconds else None

  @property
  def images_per_second(self) -> float | None:
    return self.images / self.seconds if self.seconds else None


def estimate(twin_compiled, gen: Generation, images_per_chip: float, scale: float = 1.0):
  """The Estimate read from a `twin_config` program, its counts multiplied by `scale` (the real
  batch over the twin's, when the twin was compiled at a smaller batch)."""
  seconds = roofline_seconds(twin_compiled)
  return Estimate(
    flops=utils.xla_flops(twin_compiled) * scale,
    seconds=None if seconds is None else seconds * scale,
    images=images_per_chip,
    peak_flops=gen.peak_flops,
  )


def text_encoder_costs(name: str, mesh, gen: Generation, batch_size: int, length: int, dtype: str):
  """The compiler's estimate of one forward of released text encoder `name` on `mesh`: FLOPs
  and roofline time of twins of depth 1 and 2, unrolled, extrapolated linearly to the full
  depth (minutes to compile instead of the full unrolled program's)."""
  from dit_jax import text_encoders

  twins = [
    text_encoders.compile_forward(name, mesh, batch_size, length, dtype, depth) for depth in (1, 2)
  ]
  depth = text_encoders.RELEASED[name].depth
  seconds = [roofline_seconds(c) for c in twins]
  return Estimate(
    flops=text_encoders.extrapolate(*(utils.xla_flops(c) for c in twins), depth),
    seconds=None if None in seconds else text_encoders.extrapolate(*seconds, depth),
    images=batch_size / mesh.size,
    peak_flops=gen.peak_flops,
  )
