"""Does a config fit a TPU slice? Compiles its real train step for a TPU topology on any machine.

  pip install -e ".[tpu]"     # libtpu: compiles for TPUs, no TPU needed
  python -m launch.aot_compile --config=configs/dit_imagenet256.py:variant=XL/2 --topology=v5p-8
  python -m launch.aot_compile --config=configs/dit_imagenet256.py:variant=XL/2 \
      --topology=v5e-16 --config.parallel.preset=fsdp --config.parallel.mesh.data=1 \
      --config.parallel.mesh.fsdp=-1

The step is built by the same factory training uses (`experiment.build` + `jit_train_step`: same
model, shardings, donation) over the devices of libtpu's description of the topology, lowered
with abstract inputs and compiled. Prints per-device memory (arguments, outputs, temporaries,
total against the chip's HBM) and a verdict; exits 0 if it fits, 1 if not. With --flops (the
default) it also prints the compiler's estimates of speed, read from a twin of the step with the
blocks unrolled and XLA's attention: FLOPs per step, XLA's roofline time per step
(`optimal_seconds`), and the MFU and images/s per chip they imply against the chip's bfloat16
peak. They are XLA's cost model, not measurements. If the twin does not fit at the real batch,
--flops_batch=N compiles it at global batch N and scales its counts up in proportion. With
config.data.buckets, training compiles one program per bucket: each is compiled and reported
(exit 0 only if all fit).
Topologies: accelerator types (v4-64, v5p-32: TensorCores; v5e-16, v6e-8: chips) or explicit
`<generation>:<AxBxC>` names (v5p:2x2x4).
"""

import math
import sys

import jax
from absl import flags
from ml_collections import config_flags

from dit_jax import aot, cli, models
from dit_jax.aot import GiB
from dit_jax.data import buckets
from dit_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "e.g. v5p-8, v5e-16, v4-64, v5p:2x2x4.")
_NUM_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "Slices joined by DCN (multi-slice).", lower_bound=1
)
_FLOPS = flags.DEFINE_bool(
  "flops",
  True,
  "Also compile a twin with the block scan unrolled to read XLA's FLOP count (XLA counts a loop "
  "body once); memory always comes from the program training runs.",
)
_FLOPS_BATCH = flags.DEFINE_integer(
  "flops_batch",
  0,
  "Global batch of the FLOP-counting twin (0: the config's); its counts are scaled to the real "
  "batch. For steps whose unrolled twin does not fit at the real batch.",
  lower_bound=0,
)
_TEXT = flags.DEFINE_enum(
  "text_encoder",
  None,
  ["clip_l", "clip_g", "t5_xxl"],
  "Compile this SD3 text encoder's forward (params fsdp over the slice) instead of a config.",
)
_TEXT_BATCH = flags.DEFINE_integer("text_batch_size", 256, "With --text_encoder: global batch.")
_TEXT_LENGTH = flags.DEFINE_integer(
  "text_length", 0, "With --text_encoder: tokens per caption (0: SD3's, 77 or 256)."
)
flags.mark_flags_as_required(["topology"])
flags.mark_flags_as_mutual_exclusive(["config", "text_encoder"], required=True)


def _print_config(gen, shape, exp, config):
  n, b = exp.mesh.size, config.train.batch_size
  shards = exp.mesh.shape["data"] * exp.mesh.shape["fsdp"]
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
  print(
    f"topology      {_TOPOLOGY.value}: {gen.name} {'x'.join(map(str, shape))}, {n} devices "
    f"({_NUM_SLICES.value} slice(s)), {gen.hbm_bytes / GiB:.0f} GiB HBM each"
  )
  print(
    f"model         {config.model.name} {config.model.variant}: {params / 1e6:.1f}M params; "
    f"global batch {b} ({b // shards} per data shard)"
  )
  print(
    f"mesh          {dict(exp.mesh.shape)}, preset {config.parallel.preset}, "
    f"remat {config.model.remat}, compute {config.model.dtype}, "
    f"attention {config.model.attention}"
  )


def _print_estimates(config, gen, exp, devices, size=None) -> None:
  """The compiler's estimates of speed, from the unrolled twin with XLA attention."""
  b = config.train.batch_size
  twin_b = _FLOPS_BATCH.value or b
  try:
    twin = aot.build(aot.twin_config(config, twin_b), devices)
    compiled = aot.compile_train_step(twin, size)
  except ConfigError as e:
    sys.exit(f"Error: --flops_batch={twin_b}: {e}")
  except jax.errors.JaxRuntimeError as e:
    if aot.out_of_memory_bytes(e) is None:
      raise
    print(
      f"estimates     n/a: the unrolled twin does not fit at global batch {twin_b}; rerun with "
      "--flops_batch=<a smaller global batch> (counts are scaled up in proportion)"
    )
    return
  est = aot.estimate(compiled, gen, b / exp.mesh.size, scale=b / twin_b)
  scaled = f", scaled from global batch {twin_b}" if twin_b != b else ""
  print(
    "estimates     XLA's cost model of the step (blocks unrolled, XLA attention"
    f"{scaled}): compiler estimates, not measurements"
  )
  print(
    f"  flops       {est.flops / 1e12:8.2f} TFLOP per device per step, "
    f"{est.flops * exp.mesh.size / b / 1e9:.1f} GFLOP per image (multiply-add = 2)"
  )

  def n_a(value, fmt, factor=1.0):
    return "     n/a" if value is None else format(value * factor, fmt)

  print(f"  roofline    {n_a(est.seconds, '8.3f')} s per step (XLA's optimal_seconds, per device)")
  print(
    f"  MFU         {n_a(est.mfu, '8.1f', 100)} % of {gen.peak_flops / 1e12:.0f} "
    f"bf16 TFLOP/s per {gen.name} chip (FLOPs / roofline time)"
  )
  print(
    f"  images/s    {n_a(est.images_per_second, '8.1f')} per chip "
    f"({est.images:g} images per chip per step / roofline time)"
  )


def _main_text_encoder(gen, shape, devices):
  """Memory of the full-depth forward and the compiler's speed estimates from its twins."""
  from dit_jax import text_encoders

  name, b = _TEXT.value, _TEXT_BATCH.value
  length = _TEXT_LENGTH.value or text_encoders.SD3_LENGTHS[name]
  mesh = text_encoders.make_mesh("1,-1,1", devices)
  if b <= 0 or b % mesh.size:
    sys.exit(
      f"Error: --text_batch_size={b} must be a positive multiple of the {mesh.size} devices."
    )
  config = text_encoders.RELEASED[name]
  print(
    f"topology      {_TOPOLOGY.value}: {gen.name} {'x'.join(map(str, shape))}, {mesh.size} "
    f"devices, {gen.hbm_bytes / GiB:.0f} GiB HBM each"
  )
  print(
    f"model         {name}: width {config.width}, depth {config.depth}, bfloat16 params and "
    f"compute, params fsdp over {mesh.size} devices; global batch {b} x {length} tokens"
  )
  r = aot.report(text_encoders.compile_forward(name, mesh, b, length), gen.hbm_bytes)
  print(
    f"per device:   arguments {r.arguments / GiB:.2f} GiB (param shard + ids), outputs "
    f"{r.outputs / GiB:.2f} GiB, temporaries {r.temporaries / GiB:.2f} GiB, total "
    f"{r.total / GiB:.2f} GiB of {r.hbm / GiB:.0f} GiB ({100 * r.total / r.hbm:.0f}%)"
  )
  est = aot.text_encoder_costs(name, mesh, gen, b, length, "bfloat16")
  print(
    "estimates     XLA's cost model, twins of depth 1 and 2 extrapolated to depth "
    f"{config.depth}: compiler estimates, not measurements"
  )
  print(
    f"  flops       {est.flops / 1e12:8.2f} TFLOP per device per call, "
    f"{est.flops * mesh.size / b / 1e9:.1f} GFLOP per caption"
  )
  if est.seconds:
    print(f"  roofline    {est.seconds:8.3f} s per call (per device)")
    print(f"  MFU         {100 * est.mfu:8.1f} % of the chip's bf16 peak")
    print(f"  captions/s  {est.images_per_second:8.1f} per chip")
  print(f"verdict       {'FITS' if r.fits else 'DOES NOT FIT'}")
  sys.exit(0 if r.fits else 1)


def main(argv):
  del argv
  if _TEXT.value:
    try:
      gen, shape = aot.parse_topology(_TOPOLOGY.value)
      devices = aot.topology_devices(gen, shape, _NUM_SLICES.value)
    except ValueError as e:
      sys.exit(f"Error: {e}")
    except (ImportError, RuntimeError) as e:
      sys.exit(f"Error: no TPU compiler ({e}). Install libtpu with: pip install -e '.[tpu]'")
    _main_text_encoder(gen, shape, devices)
  config = _CONFIG.value
  try:
    gen, shape = aot.parse_topology(_TOPOLOGY.value)
    devices = aot.topology_devices(gen, shape, _NUM_SLICES.value)
    exp = aot.build(config, devices)
  except (ValueError, ConfigError) as e:
    sys.exit(f"Error: {e}")
  except (ImportError, RuntimeError) as e:
    sys.exit(f"Error: no TPU compiler ({e}). Install libtpu with: pip install -e '.[tpu]'")
  _print_config(gen, shape, exp, config)
  # With config.data.buckets training compiles one program per bucket: check each.
  sizes = buckets.parse(config.data.buckets) or ((config.data.image_size,) * 2,)
  fits = [_check_size(config, gen, exp, devices, size, len(sizes) > 1) for size in sizes]
  if len(sizes) > 1:
    print(
      f"verdict       {sum(fits)} of {len(sizes)} buckets fit"
      + ("" if all(fits) else f": {aot.fit_hints(config)}")
    )
  sys.exit(0 if all(fits) else 1)


def _check_size(config, gen, exp, devices, size, bucketed: bool) -> bool:
  """Compiles the step for images of `size` = (height, width), prints its memory (and with
  --flops the estimates); returns whether it fits."""
  h, w = size
  if bucketed:
    patch = models.variant_dims(config.model)["patch"]
    tokens = (h // patch) * (w // patch)
    print(f"bucket        {h}x{w} ({tokens} image tokens)")
  try:
    compiled = aot.compile_train_step(exp, size)
  except jax.errors.JaxRuntimeError as e:
    needed = aot.out_of_memory_bytes(e)
    if needed is None:
      raise
    # The TPU compiler refuses programs that cannot fit; it reports what they would need.
    print(
      f"memory        the compiler needs {needed / GiB:.2f} GiB of temporaries per device "
      f"alone, {gen.hbm_bytes / GiB:.0f} GiB HBM"
    )
    print(
      f"verdict       DOES NOT FIT: over by at least {(needed - gen.hbm_bytes) / GiB:.2f} GiB "
      f"per device; {aot.fit_hints(config)}"
    )
    return False
  r = aot.report(compiled, gen.hbm_bytes)
  print("per device:")
  print(f"  arguments   {r.arguments / GiB:8.2f} GiB  (train state shard + batch shard)")
  print(
    f"  outputs     {r.outputs / GiB:8.2f} GiB  ({r.aliased / GiB:.2f} GiB reuse donated inputs)"
  )
  print(f"  temporaries {r.temporaries / GiB:8.2f} GiB  (activations, gradients, scratch)")
  print(
    f"  total       {r.total / GiB:8.2f} GiB  of {r.hbm / GiB:.0f} GiB HBM "
    f"({100 * r.total / r.hbm:.0f}%)"
  )
  if _FLOPS.value:
    _print_estimates(config, gen, exp, devices, size)
  if r.fits:
    print(f"verdict       FITS, {(r.hbm - r.total) / GiB:.2f} GiB to spare per device")
  else:
    print(
      f"verdict       DOES NOT FIT: over by {(r.total - r.hbm) / GiB:.2f} GiB per device; "
      f"{aot.fit_hints(config)}"
    )
  return r.fits


if __name__ == "__main__":
  cli.run(main)
