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

  python -m dit_jax.benchmark --config=configs/dit_imagenet256.py --config.data.path=DIR \
      --input --steps=100

times the training input alone: the config's data read as training reads it (grain, workers,
prefetch) and placed on the devices, in images/s of this process; no model is built.

  python -m dit_jax.benchmark --config=configs/quickstart.py --loop --steps=20

times the training loop's step, the config's data prefetched into the jitted train step, beside
the same step on a batch already on the devices, and their ratio (1 = the step never waits for
the input; config.data.prefetch=0 shows the cost of reading each batch in the step).

  python -m dit_jax.benchmark --text_encoder=t5_xxl --text_batch_size=8

times one of SD3's text encoders (clip_l, clip_g, t5_xxl: the released architecture, random
weights, params laid out by the fsdp preset over all devices) on captions of SD3's token length,
in captions/s, with FLOPs per caption from twins of depth 1 and 2 extrapolated to the full depth.
This is the rate of `python -m dit_jax.tools.encode_text` after tokenization.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dit_jax import checks, cli, conditioning, experiment, parallel, storage, text_encoders, utils
from dit_jax.config_defaults import base_config
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.experiment import ema as ema_lib
from dit_jax.models import autoencoder
from dit_jax.models.autoencoder import AutoencoderKL
from dit_jax.train import loop

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
_INPUT = flags.DEFINE_bool(
  "input", None, "Time the input pipeline of --config alone (no model), in images/s."
)
_LOOP = flags.DEFINE_bool(
  "loop", None, "Time the training loop's step on --config's data beside the step alone."
)
_COMPARE = flags.DEFINE_enum(
  "compare",
  None,
  ["torch"],
  "Also time the PyTorch reference (diffusers' DiT + AdamW, dit_jax.benchmark_torch) on the same "
  "shapes, batch and threads, and print the ratios.",
)
_TRAJ_STEPS = flags.DEFINE_integer(
  "trajectory_steps",
  250,
  "With --compare: also time whole guided DDPM sampling of this many steps (0: skip).",
  lower_bound=0,
)
_TRAJ_BATCH = flags.DEFINE_integer(
  "trajectory_batch", 4, "With --compare: images per sampled trajectory.", lower_bound=1
)
_PEAK_SIZE = flags.DEFINE_integer(
  "peak_size",
  4096,
  "Side of the square float32 jnp.dot that measures the matmul peak.",
  lower_bound=1,
)
_TEXT = flags.DEFINE_enum(
  "text_encoder", None, ["clip_l", "clip_g", "t5_xxl"], "Time this SD3 text encoder instead."
)
_TEXT_BATCH = flags.DEFINE_integer(
  "text_batch_size", 8, "With --text_encoder: captions per call, over all devices."
)
_TEXT_LENGTH = flags.DEFINE_integer(
  "text_length", 0, "With --text_encoder: tokens per caption (0: SD3's, 77 or 256)."
)
_TEXT_DTYPE = flags.DEFINE_enum(
  "text_dtype", "bfloat16", ["float32", "bfloat16"], "With --text_encoder: params and compute."
)
flags.mark_flags_as_mutual_exclusive(["config", "vae", "inception", "text_encoder"], required=True)
flags.mark_flags_as_mutual_exclusive(["input", "loop"])


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


def lower_steps(config, concrete: bool = True):
  """Builds `config` and lowers its train step and one guided sampling step (not compiled):
  (experiment, {name: (lowered program, its arguments)}). The arguments are a fresh state and a
  random batch on the devices, or with `concrete=False` only their shapes and shardings (for
  counting, when nothing is run)."""
  exp = experiment.build(config)
  rng = np.random.default_rng(0)
  abstract = exp.abstract_batch()
  b, *image_shape = abstract["image"].shape
  sharding = abstract["image"].sharding

  def fill(s: jax.ShapeDtypeStruct) -> np.ndarray:
    if jnp.issubdtype(s.dtype, jnp.integer):
      return rng.integers(0, config.model.num_classes, s.shape).astype(s.dtype)
    return rng.standard_normal(s.shape, np.float32)

  if concrete:
    batch = {k: jax.device_put(fill(s), s.sharding) for k, s in abstract.items()}
  else:
    batch = abstract
  _, cond = conditioning.split_batch(batch)
  with exp.context():
    state = exp.init_state() if concrete else exp.abstract_state
    train = exp.jit_train_step().lower(state, batch)
    scale = config.sample.guidance_scale

    def sample_step(params, z, t, cond):
      def apply(z_, t_, c_):
        return exp.model.apply({"params": params}, z_, t_, c_)

      null = exp.conditioner.null(cond)
      return guidance.guided(apply, cond, null, scale, image_shape[-1])(z, t)

    # The EMA sampling reads (one of several power EMAs).
    if concrete:
      params = ema_lib.select(exp.init_state().ema_params, config)
      t = jax.device_put(jnp.full((b,), 500.0), sharding)
    else:
      params = ema_lib.select(exp.abstract_state.ema_params, config)
      t = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=sharding)
    z = batch["image"]
    sample = jax.jit(sample_step).lower(params, z, t, cond)
  return exp, {"train": (train, (state, batch)), "sample": (sample, (params, z, t, cond))}


def _compile(config, concrete: bool = True):
  """`lower_steps(config, concrete)` with its programs compiled."""
  exp, programs = lower_steps(config, concrete)
  with exp.context():
    return exp, {name: (p.compile(), args) for name, (p, args) in programs.items()}


def flops(config) -> dict[str, float]:
  """XLA's FLOPs of the train step and of one guided sampling step of `config`: {"train": ...,
  "sample": ...}, counted on a twin with the block scan fully unrolled (XLA counts a loop body
  once), which is compiled from shapes alone for the count: nothing is initialized or run."""
  _, programs = _compile(utils.fully_unrolled(config), concrete=False)
  return {name: utils.xla_flops(compiled) for name, (compiled, _) in programs.items()}


def benchmark(config, steps: int = 10, warmup: int = 2) -> dict[str, dict[str, float]]:
  """Returns {"train": {...}, "sample": {...}} with seconds, images/s, FLOPs per image, FLOP/s."""
  counts = flops(config)
  exp, programs = _compile(config)
  results = {}
  with exp.context():
    for name, (compiled, args) in programs.items():
      seconds = _time(compiled, args, steps, warmup, carry=name == "train")
      results[name] = {"seconds": seconds, "flops": counts[name]}
  b = config.train.batch_size
  for r in results.values():
    r["images_per_sec"] = b / r["seconds"]
    r["gflops_per_image"] = r["flops"] / b / 1e9
    r["paper_gflops_per_image"] = r["gflops_per_image"] / 2
    r["tflops_per_sec"] = r["flops"] / r["seconds"] / 1e12
  return results


def matmul_peak(size: int = 4096, steps: int = 3) -> float:
  """XLA's float32 matrix-product rate on this machine, FLOP/s: the median of `steps` products of
  two random [size, size] matrices on the default device, as `jnp.dot` compiles them."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2))
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  seconds = _time(compiled, (a, b), steps, 1, carry=False)
  return 2.0 * size**3 / seconds


def trajectory_config(config, batch_size: int, num_steps: int):
  """`config` set to sample `batch_size` images with `num_steps` guided DDPM steps (the official
  DiT sampler) from one jitted call."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sample.sampler = "ddpm"
    config.sample.num_steps = num_steps
    config.sample.batch_size = batch_size
  return config


def benchmark_trajectory(config, batch_size: int = 4, num_steps: int = 250) -> float:
  """Seconds for dit_jax to sample `batch_size` images with `num_steps` guided DDPM steps: the
  whole solver loop in one jitted call (`sampling.make_sampler`), timed on its second call."""
  from dit_jax.evaluation import sampling

  config = trajectory_config(config, batch_size, num_steps)
  exp = experiment.build(config)
  run = sampling.make_sampler(exp)
  with exp.context():
    params = ema_lib.select(exp.init_state().ema_params, config)
  labels = np.arange(batch_size, dtype=np.int32) % config.model.num_classes
  indices = np.arange(batch_size, dtype=np.int32)
  key = jax.random.key(0)

  def once():
    return run(params, {"label": labels}, indices, key, gather=False)

  jax.block_until_ready(once())  # Compiles.
  start = time.perf_counter()
  jax.block_until_ready(once())
  return time.perf_counter() - start


def benchmark_input(config, steps: int = 100, warmup: int = 5) -> dict[str, float]:
  """Seconds per batch and images/s of the training input alone, on this process.

  Reads the config's data as training does (`loop.train_batches`: its source, grain settings and
  prefetch), this process's rows of each global batch placed on all devices, with no step
  running. Returns {"seconds": per batch, "images_per_sec": this process's images per second}.
  """
  checks.validate(config)
  mesh = parallel.make_mesh(config)
  parallel.check_batch_size(config.train.batch_size, mesh)
  batches = loop.train_batches(config, mesh)
  try:
    for _ in range(warmup):  # grain's threads start; their first read-ahead is not timed.
      jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(batches))
    seconds = (time.perf_counter() - start) / steps
  finally:
    batches.close()
  local = config.train.batch_size // jax.process_count()
  return {"seconds": seconds, "images_per_sec": local / seconds}


# Steps of each kind in a row in benchmark_loop.
_LOOP_BLOCK = 4


def benchmark_loop(config, steps: int = 10, warmup: int = 2) -> dict[str, float]:
  """Median seconds per train step as the training loop runs it and of the step alone.

  "loop": `loop.train_batches` (the config's data, prefetched as config.data.prefetch says)
  feeding the jitted train step, the path of `loop.run`; "step": the same jitted step on one batch
  already on the devices. Each step is waited for. The two alternate in blocks of `_LOOP_BLOCK`
  steps, so that a change in the machine's load slows both alike; before each block of the loop,
  config.data.prefetch untimed steps use up the batches made ahead while the step ran alone.
  "ratio" is loop / step, 1 when the input never keeps the step waiting; "wait" is the median
  time a loop step spent in `next` for its batch, the part of "loop" that a slow input grows,
  which stays readable on a machine so busy that the two medians differ by more than that. At
  least one untimed step compiles first.
  """
  exp = experiment.build(config)
  batches = loop.train_batches(config, exp.mesh)
  times = {"loop": [], "step": [], "wait": []}
  try:
    batches.start_prefetch()
    with exp.context():
      step_fn = exp.jit_train_step()
      state = exp.init_state()
      resident = next(batches)
      for _ in range(max(warmup, 1)):
        state, metrics = step_fn(state, next(batches))
      jax.block_until_ready((state, metrics))

      def timed(kind: str) -> None:
        nonlocal state, metrics
        start = time.perf_counter()
        batch = next(batches) if kind == "loop" else resident
        got = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        times[kind].append(time.perf_counter() - start)
        if kind == "loop":
          times["wait"].append(got - start)

      while len(times["step"]) < steps:
        for _ in range(config.data.prefetch):
          state, metrics = step_fn(state, next(batches))
        jax.block_until_ready((state, metrics))
        for kind in ("loop", "step"):
          for _ in range(_LOOP_BLOCK):
            timed(kind)
  finally:
    batches.close()
  out = {name: statistics.median(t) for name, t in times.items()}
  return {**out, "ratio": out["loop"] / out["step"]}


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
  from dit_jax.models import inception

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


def text_encoder_flops(name: str, batch_size: int, length: int, mesh, dtype: str) -> float:
  """XLA's FLOPs of one forward of released text encoder `name`, summed over devices: twins of
  depth 1 and 2, unrolled, extrapolated linearly to the depth."""
  counts = [
    utils.xla_flops(text_encoders.compile_forward(name, mesh, batch_size, length, dtype, d))
    for d in (1, 2)
  ]
  depth = text_encoders.RELEASED[name].depth
  return text_encoders.extrapolate(*counts, depth) * mesh.size


def benchmark_text_encoder(
  name: str,
  batch_size: int = 8,
  length: int = 0,
  dtype: str = "bfloat16",
  steps: int = 10,
  warmup: int = 2,
) -> dict[str, float]:
  """Seconds per call, captions/s, FLOPs per caption and FLOP/s of released text encoder `name`
  (random weights) on `batch_size` captions of `length` tokens (0: SD3's) over all devices."""
  length = length or text_encoders.SD3_LENGTHS[name]
  mesh = text_encoders.make_mesh()
  n = parallel.data_parallel_size(mesh)
  if batch_size <= 0 or batch_size % n or length <= 0:
    raise ConfigError(
      f"--text_batch_size={batch_size} must be a positive multiple of the {n} devices and "
      f"--text_length={length} positive."
    )
  config = text_encoders.RELEASED[name]
  if name != "t5_xxl" and length > config.max_positions:
    raise ConfigError(f"--text_length={length}: {name} has {config.max_positions} positions.")
  module = text_encoders.released_module(name, dtype)
  rules = parallel.PRESETS["fsdp"]
  fn, abstract, ids_shape = text_encoders.sharded_forward(
    module, (batch_size, length), mesh, rules, dtype
  )
  params = text_encoders.random_params(abstract)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch_size, length), np.int32)
  ids = jax.device_put(ids, ids_shape.sharding)
  with jax.set_mesh(mesh):
    seconds = _time(fn, (params, ids), steps, warmup, carry=False)
  del params
  flops = text_encoder_flops(name, batch_size, length, mesh, dtype)
  return {
    "seconds": seconds,
    "captions_per_sec": batch_size / seconds,
    "gflops_per_caption": flops / batch_size / 1e9,
    "tflops_per_sec": flops / seconds / 1e12,
    "params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)),
  }


def _main_text_encoder():
  name, b, dtype = _TEXT.value, _TEXT_BATCH.value, _TEXT_DTYPE.value
  length = _TEXT_LENGTH.value or text_encoders.SD3_LENGTHS[name]
  r = benchmark_text_encoder(name, b, length, dtype, _STEPS.value, _WARMUP.value)
  print(
    f"{name} (released architecture, {r['params'] / 1e9:.2f}B params, stand-in weights), batch "
    f"{b} x {length} tokens, {_machine()}, dtype {dtype}, params fsdp over the devices"
  )
  print(f"{'':12}{'s/batch':>10}{'captions/s':>12}{'GFLOP/cap':>11}{'TFLOP/s':>9}")
  print(
    f"{'encode':12}{r['seconds']:>10.3f}{r['captions_per_sec']:>12.3f}"
    f"{r['gflops_per_caption']:>11.1f}{r['tflops_per_sec']:>9.3f}"
  )


def _describe_data(config) -> str:
  d = config.data
  where = f" {d.path}" if d.path else ""
  return (
    f"data {d.name!r}{where}, {d.image_size}x{d.image_size}x{d.channels}, "
    f"{d.num_workers} worker processes, prefetch {d.prefetch}"
  )


def _main_input(config):
  r = benchmark_input(config, _STEPS.value, _WARMUP.value)
  local = config.train.batch_size // jax.process_count()
  print(
    f"input pipeline: {_describe_data(config)}, batches of {local} on process "
    f"{jax.process_index()} of {jax.process_count()}, onto {jax.device_count()} x "
    f"{jax.devices()[0].device_kind}"
  )
  print(f"{'':10}{'s/batch':>10}{'images/s':>11}")
  print(f"{'input':10}{r['seconds']:>10.4f}{r['images_per_sec']:>11.1f}")


def _main_loop(config):
  r = benchmark_loop(config, _STEPS.value, _WARMUP.value)
  b = config.train.batch_size
  print(
    f"{config.model.variant}, batch {b}, {_describe_data(config)}, "
    f"{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {config.model.dtype}"
  )
  print(f"{'':22}{'s/step':>10}{'images/s':>11}")
  for name, label in (("loop", "loop (data, prefetch)"), ("step", "step alone (resident)")):
    print(f"{label:22}{r[name]:>10.4f}{b / r[name]:>11.1f}")
  print(f"{'ratio loop / step':22}{r['ratio']:>10.3f}")
  share = 100 * r["wait"] / r["step"]
  print(f"{'input wait per step':22}{r['wait']:>10.4f}  ({share:.1f}% of the step alone)")


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


def _check_flag_combinations() -> None:
  f = flags.FLAGS
  modes = ("vae", "inception", "text_encoder", "input", "loop")
  other_mode = next((m for m in modes if f[m].value), None)
  if _COMPARE.value and other_mode:
    raise ConfigError(
      f"--compare times the train and sampling steps of --config; it does not apply to "
      f"--{other_mode}. Drop one of the two."
    )
  for name in ("trajectory_steps", "trajectory_batch"):
    if f[name].present and not _COMPARE.value:
      raise ConfigError(f"--{name} applies only with --compare=torch; add it or drop --{name}.")


def main(argv):
  del argv
  _check_flag_combinations()
  storage.check_reachable(_VAE.value or "", _INCEPTION.value or "")
  if _TEXT.value:
    _main_text_encoder()
    return
  if _VAE.value or _INCEPTION.value:
    _main_vae() if _VAE.value else _main_inception()
    return
  config = _CONFIG.value
  cli.check_config_paths(config)
  if _INPUT.value or _LOOP.value:
    _main_input(config) if _INPUT.value else _main_loop(config)
  else:
    _main_steps(config)


def _cpu_name() -> str:
  import platform

  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _machine() -> str:
  """The devices, and for CPUs the cores this process may use and the processor's name."""
  cpu = ""
  if jax.devices()[0].platform == "cpu":
    cpu = f" ({len(os.sched_getaffinity(0))} cores of {_cpu_name()})"
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}{cpu}"


def _main_steps(config):
  compare = _COMPARE.value
  if compare:
    from dit_jax import benchmark_torch

    benchmark_torch.check_config(config)  # Before minutes of compiling.
  results = benchmark(config, _STEPS.value, _WARMUP.value)
  peak = matmul_peak(_PEAK_SIZE.value)
  b = config.train.batch_size
  print(
    f"{config.model.variant}, batch {b}, "
    f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}, "
    f"{_machine()}, dtype {config.model.dtype}, guidance {config.sample.guidance_scale}, "
    f"scan_unroll {config.model.scan_unroll}"
  )
  print(
    f"XLA float32 matmul peak: {peak / 1e12:.3f} TFLOP/s "
    f"(jnp.dot of two {_PEAK_SIZE.value}x{_PEAK_SIZE.value} matrices)"
  )
  print(
    f"{'':20}{'s/step':>10}{'images/s':>11}{'GFLOP/img':>11}{'paper GF':>10}{'TFLOP/s':>9}"
    f"{'of peak':>9}"
  )
  labels = {"train": "train step", "sample": "sample step"}
  for name, r in results.items():
    print(
      f"{'dit_jax ' + labels[name]:20}{r['seconds']:>10.4f}{r['images_per_sec']:>11.2f}"
      f"{r['gflops_per_image']:>11.2f}{r['paper_gflops_per_image']:>10.2f}"
      f"{r['tflops_per_sec']:>9.3f}{100 * r['flops'] / r['seconds'] / peak:>8.0f}%"
    )
  if not compare:
    return
  from dit_jax import benchmark_torch

  steps, n = _TRAJ_STEPS.value, _TRAJ_BATCH.value
  trajectory = {"batch_size": n, "num_steps": steps} if steps else None
  threads = len(os.sched_getaffinity(0))
  torch_s = benchmark_torch.benchmark(config, _STEPS.value, _WARMUP.value, threads, trajectory)
  for name in ("train", "sample"):
    flops = results[name]["flops"]  # The same arithmetic (the PyTorch step does the same work).
    sec = torch_s[name]
    print(
      f"{'torch ' + labels[name]:20}{sec:>10.4f}{b / sec:>11.2f}{'':>11}{'':>10}"
      f"{flops / sec / 1e12:>9.3f}{100 * flops / sec / peak:>8.0f}%"
    )
  print(f"PyTorch {benchmark_torch.versions()}, {threads} threads; ratios dit_jax / torch (speed):")
  for name in ("train", "sample"):
    print(f"  {labels[name]:18}{torch_s[name] / results[name]['seconds']:>6.2f}x")
  if trajectory:
    jax_s = benchmark_trajectory(config, n, steps)
    print(
      f"  trajectory        {torch_s['trajectory'] / jax_s:>6.2f}x   ({steps} guided DDPM steps, "
      f"batch {n}: dit_jax {jax_s:.2f} s in one jitted loop, torch {torch_s['trajectory']:.2f} s "
      "in a Python loop of forward calls)"
    )


if __name__ == "__main__":
  cli.run(main)
