"""Times the real train step and one sampling step of a config, and reports XLA's FLOP counts.

  python -m dit_jax.benchmark --config=configs/dit_imagenet256.py:variant=S/2 \
      --config.train.batch_size=32

Inputs are random arrays of the config's shape (no data pipeline), so this measures the compiled
step alone. FLOPs come from XLA's cost analysis, which counts a multiply-add as 2 FLOPs; the DiT
paper counts it as 1, so the "paper GFLOPs" column is XLA's figure halved (DiT-XL/2: 118.6).
XLA's cost analysis counts a loop body once, so the FLOPs are read from a twin of each program
with the block scan fully unrolled; the times are those of the program training runs.

  python -m dit_jax.benchmark --vae=sd --vae_batch_size=8 --vae_image_size=256

times the autoencoder instead: encoding images and decoding latents with the real architecture
of Stable Diffusion's VAE ("sd", f8, 4 latent channels) or SD3's ("sd3", 16 channels) and random
weights, the batch split over all devices.

  python -m dit_jax.benchmark --inception --inception_batch_size=16 --inception_image_size=256

times the FID Inception (random weights of the real architecture): uint8 images of that size,
resized to 299x299 as TensorFlow 1 does, through to pool3, the sFID features and the logits, the
batch split over all devices. This is the featurization rate of `--mode=evaluate` and of
`python -m dit_jax.evaluation.fid`.
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dit_jax import cli, conditioning, parallel, utils
from dit_jax.config_defaults import base_config
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.models import autoencoder
from dit_jax.models.autoencoder import AutoencoderKL
from dit_jax.train import setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed repetitions (after warm-up).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed repetitions after compilation.", lower_bound=0)
_VAE = flags.DEFINE_enum(
  "vae", None, list(autoencoder.PRESETS), "Time this autoencoder (random weights), not --config."
)
_VAE_BATCH = flags.DEFINE_integer(
  "vae_batch_size", 8, "Images per encode / decode call.", lower_bound=1
)
_VAE_SIZE = flags.DEFINE_integer(
  "vae_image_size", 256, "Side of the (square) images.", lower_bound=1
)
_VAE_DTYPE = flags.DEFINE_enum("vae_dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_INCEPTION = flags.DEFINE_bool(
  "inception", None, "Time the FID Inception network (random weights), not --config."
)
_INC_BATCH = flags.DEFINE_integer(
  "inception_batch_size", 16, "Images per Inception call.", lower_bound=1
)
_INC_SIZE = flags.DEFINE_integer(
  "inception_image_size", 256, "Side of the (square) images.", lower_bound=1
)
_INC_DTYPE = flags.DEFINE_enum(
  "inception_dtype", "float32", ["float32", "bfloat16"], "The Inception's compute dtype."
)
flags.mark_flags_as_mutual_exclusive(["config", "vae", "inception"], required=True)


def _time(fn, args, steps: int, warmup: int, carry: bool) -> float:
  """Median seconds per call; with carry=True the first output is fed back as the first input."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
    if carry:
      args = (out[0], *args[1:])
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
    if carry:
      args = (out[0], *args[1:])
  return statistics.median(times)


def _compile(config):
  """Builds `config` and compiles its train step and one guided sampling step."""
  exp = setup.build(config)
  rng = np.random.default_rng(0)
  abstract = exp.abstract_batch()
  b, *image_shape = abstract["image"].shape
  sharding = abstract["image"].sharding

  def fill(s: jax.ShapeDtypeStruct) -> np.ndarray:
    if jnp.issubdtype(s.dtype, jnp.integer):
      return rng.integers(0, config.model.num_classes, s.shape).astype(s.dtype)
    return rng.standard_normal(s.shape, np.float32)

  batch = {k: jax.device_put(fill(s), s.sharding) for k, s in abstract.items()}
  _, cond = conditioning.split_batch(batch)
  with exp.context():
    state = exp.init_state()
    train = exp.jit_train_step().lower(state, batch).compile()
    scale = config.sample.guidance_scale

    def sample_step(params, z, t, cond):
      def apply(z_, t_, c_):
        return exp.model.apply({"params": params}, z_, t_, c_)

      null = exp.conditioner.null(cond)
      return guidance.guided(apply, cond, null, scale, image_shape[-1])(z, t)

    params = exp.init_state().ema_params
    z, t = batch["image"], jax.device_put(jnp.full((b,), 500.0), sharding)
    sample = jax.jit(sample_step).lower(params, z, t, cond).compile()
  return exp, {"train": (train, (state, batch)), "sample": (sample, (params, z, t, cond))}


def benchmark(config, steps: int = 10, warmup: int = 2) -> dict[str, dict[str, float]]:
  """Returns {"train": {...}, "sample": {...}} with seconds, images/s, FLOPs per image, FLOP/s."""
  twin = utils.fully_unrolled(config)
  flops = {name: utils.xla_flops(compiled) for name, (compiled, _) in _compile(twin)[1].items()}
  exp, programs = _compile(config)
  results = {}
  with exp.context():
    for name, (compiled, args) in programs.items():
      seconds = _time(compiled, args, steps, warmup, carry=name == "train")
      results[name] = {"seconds": seconds, "flops": flops[name]}
  b = config.train.batch_size
  for r in results.values():
    r["images_per_sec"] = b / r["seconds"]
    r["gflops_per_image"] = r["flops"] / b / 1e9
    r["paper_gflops_per_image"] = r["gflops_per_image"] / 2
    r["tflops_per_sec"] = r["flops"] / r["seconds"] / 1e12
  return results


def benchmark_vae(
  name: str = "sd",
  batch_size: int = 8,
  image_size: int = 256,
  dtype: str = "float32",
  steps: int = 10,
  warmup: int = 2,
) -> dict[str, dict[str, float]]:
  """Returns {"encode": {...}, "decode": {...}} with seconds per batch, images/s, FLOPs per image
  and FLOP/s of the autoencoder preset `name` with random weights on all devices."""
  config = autoencoder.PRESETS[name]
  mesh = parallel.make_mesh(base_config())
  n = parallel.data_parallel_size(mesh)
  f = config.downsample_factor
  if batch_size <= 0 or batch_size % n or image_size <= 0 or image_size % f:
    raise ConfigError(
      f"--vae_batch_size={batch_size} must be a positive multiple of the {n} devices and "
      f"--vae_image_size={image_size} a positive multiple of {f}."
    )
  module = AutoencoderKL(config, dtype)
  replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.device_put(autoencoder.random_params(config), replicated)
  rng = np.random.default_rng(0)
  h = image_size // f
  images = rng.uniform(-1, 1, (batch_size, image_size, image_size, config.in_channels))
  latents = rng.standard_normal((batch_size, h, h, config.latent_channels))
  inputs = {
    "encode": (AutoencoderKL.encode, jax.device_put(images.astype(np.float32), batch)),
    "decode": (AutoencoderKL.decode, jax.device_put(latents.astype(np.float32), batch)),
  }
  results = {}
  for kind, (method, x) in inputs.items():
    fn = jax.jit(
      lambda p, x, method=method: module.apply({"params": p}, x, method=method),
      in_shardings=(replicated, batch),
      out_shardings=batch,
    )
    compiled = fn.lower(params, x).compile()
    seconds = _time(compiled, (params, x), steps, warmup, carry=False)
    flops = utils.xla_flops(compiled)
    results[kind] = {
      "seconds": seconds,
      "flops": flops,
      "images_per_sec": batch_size / seconds,
      "gflops_per_image": flops / batch_size / 1e9,
      "tflops_per_sec": flops / seconds / 1e12,
    }
  return results


def benchmark_inception(
  batch_size: int = 16,
  image_size: int = 256,
  dtype: str = "float32",
  steps: int = 10,
  warmup: int = 2,
) -> dict[str, float]:
  """Seconds per batch, images/s, FLOPs per image and FLOP/s of the FID Inception (random weights,
  resize included) on uint8 images [batch_size, image_size, image_size, 3] over all devices."""
  from dit_jax.evaluation import inception

  net = inception.Inception(inception.random_params(), dtype=dtype)
  n = parallel.data_parallel_size(net.mesh)
  if batch_size <= 0 or batch_size % n or image_size <= 0:
    raise ConfigError(
      f"--inception_batch_size={batch_size} must be a positive multiple of the {n} devices and "
      f"--inception_image_size={image_size} positive."
    )
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  images = jax.device_put(images, parallel.batch_sharding(net.mesh))
  flops = net.flops(images.shape)
  seconds = _time(net.features_sharded, (images,), steps, warmup, carry=False)
  return {
    "seconds": seconds,
    "flops": flops,
    "images_per_sec": batch_size / seconds,
    "gflops_per_image": flops / batch_size / 1e9,
    "tflops_per_sec": flops / seconds / 1e12,
  }


def _main_inception():
  b, size, dtype = _INC_BATCH.value, _INC_SIZE.value, _INC_DTYPE.value
  r = benchmark_inception(b, size, dtype, _STEPS.value, _WARMUP.value)
  print(
    f"FID Inception (random weights), batch {b}, {size}x{size}x3 uint8 -> 299x299, "
    f"{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {dtype}"
  )
  print(f"{'':12}{'s/batch':>10}{'images/s':>11}{'GFLOP/img':>11}{'TFLOP/s':>9}")
  print(
    f"{'featurize':12}{r['seconds']:>10.4f}{r['images_per_sec']:>11.2f}"
    f"{r['gflops_per_image']:>11.2f}{r['tflops_per_sec']:>9.3f}"
  )


def _main_vae():
  name, b, size, dtype = _VAE.value, _VAE_BATCH.value, _VAE_SIZE.value, _VAE_DTYPE.value
  config = autoencoder.PRESETS[name]
  h = size // config.downsample_factor
  results = benchmark_vae(name, b, size, dtype, _STEPS.value, _WARMUP.value)
  print(
    f"autoencoder {name!r} (random weights), batch {b}, {size}x{size}x{config.in_channels} <-> "
    f"{h}x{h}x{config.latent_channels}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
    f"dtype {dtype}"
  )
  print(f"{'':10}{'s/batch':>10}{'images/s':>11}{'GFLOP/img':>11}{'TFLOP/s':>9}")
  for kind, r in results.items():
    print(
      f"{kind:10}{r['seconds']:>10.4f}{r['images_per_sec']:>11.2f}"
      f"{r['gflops_per_image']:>11.1f}{r['tflops_per_sec']:>9.3f}"
    )


def main(argv):
  del argv
  if _VAE.value or _INCEPTION.value:
    try:
      _main_vae() if _VAE.value else _main_inception()
    except ConfigError as e:
      sys.exit(f"Error: {e}")
    return
  config = _CONFIG.value
  results = benchmark(config, _STEPS.value, _WARMUP.value)
  print(
    f"{config.model.variant}, batch {config.train.batch_size}, "
    f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}, "
    f"{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {config.model.dtype}, "
    f"guidance {config.sample.guidance_scale}"
  )
  print(f"{'':14}{'s/step':>10}{'images/s':>11}{'GFLOP/img':>11}{'paper GF':>10}{'TFLOP/s':>9}")
  for name, r in results.items():
    label = "train step" if name == "train" else "sample step"
    print(
      f"{label:14}{r['seconds']:>10.4f}{r['images_per_sec']:>11.1f}"
      f"{r['gflops_per_image']:>11.2f}{r['paper_gflops_per_image']:>10.2f}"
      f"{r['tflops_per_sec']:>9.3f}"
    )


if __name__ == "__main__":
  cli.run(main)
