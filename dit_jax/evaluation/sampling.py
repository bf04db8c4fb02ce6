"""Conditional sampling with guidance (class labels or text): the whole solver loop in one
jitted call."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import data, parallel, utils
from dit_jax import diffusion as diffusion_lib
from dit_jax.data import text
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.train.setup import Experiment


def sample_labels(config: ml_collections.ConfigDict, num: int, seed: int) -> np.ndarray:
  """Balanced (0, 1, ..., K-1, 0, 1, ...) or uniformly random class labels [num]."""
  k = config.model.num_classes
  if config.sample.labels == "balanced":
    return (np.arange(num) % k).astype(np.int32)
  return np.random.default_rng(seed).integers(0, k, num).astype(np.int32)


def _read_prompts(path: str) -> list[str]:
  """The non-empty lines of a prompts file (config.sample.prompts)."""
  prompts = [p for p in text.read_captions(path) if p]
  if not prompts:
    raise ConfigError(f"config.sample.prompts={path!r} holds no prompts (one per line).")
  return prompts


def text_conditions(config: ml_collections.ConfigDict, num: int) -> tuple[dict, list[str]]:
  """Text conditioning for `num` images: prompts cycled in order, and their captions.

  `config.sample.prompts` is a directory written by dit_jax.tools.encode_text (context.npy,
  pooled.npy, captions.txt), or a text file of prompts that the built-in encoder of the `shapes`
  data can encode; `config.sample.prompt_text` gives such prompts in the config ("|"-separated);
  neither: the held-out captions of `shapes`, or the data's own captions.
  """
  path, name, inline = config.sample.prompts, config.data.name, config.sample.prompt_text
  if path and inline:
    raise ConfigError(
      "Set config.sample.prompts (a file or directory) or config.sample.prompt_text, not both."
    )
  if (path and os.path.isdir(path)) or (not path and not inline and name == "latents"):
    directory = path or config.data.path
    spec, want = text.TextSpec.load(directory), data.text_spec(config)
    got_sizes = (spec.context_len, spec.context_dim, spec.pooled_dim)
    want_sizes = (want.context_len, want.context_dim, want.pooled_dim)
    if got_sizes != want_sizes:
      raise ConfigError(
        f"config.sample.prompts={directory!r} holds text of sizes (context_len, context_dim, "
        f"pooled_dim)={got_sizes}, but the model takes {want_sizes}; encode the prompts with "
        "the encoders and max lengths used for the training data."
      )
    context = np.load(os.path.join(directory, text.CONTEXT_FILE), mmap_mode="r")
    pooled = np.load(os.path.join(directory, text.POOLED_FILE), mmap_mode="r")
    captions_path = os.path.join(directory, text.CAPTIONS_FILE)
    captions = text.read_captions(captions_path) if os.path.isfile(captions_path) else None
    idx = np.arange(num) % len(pooled)
    cond = {"context": np.asarray(context[idx], np.float32), "pooled": np.asarray(pooled[idx])}
    names = [captions[i] if captions and i < len(captions) else f"prompt {i}" for i in idx]
    return {k: v.astype(np.float32) for k, v in cond.items()}, names
  if name != "shapes":
    raise ConfigError(
      f"Prompts {path or inline!r} (config.sample.prompts / prompt_text) can be encoded "
      "in-process only for the built-in 'shapes' data; for other data encode them with `python -m "
      "dit_jax.tools.encode_text --captions=FILE --out=DIR` and set config.sample.prompts=DIR."
    )
  from dit_jax.data import shapes

  if path:
    prompts = _read_prompts(path)
  elif inline:
    prompts = [p.strip() for p in inline.split("|") if p.strip()]
  else:
    prompts = shapes.held_out_captions()
  captions = [prompts[i % len(prompts)] for i in range(num)]
  context, pooled = shapes.encode_captions(captions)
  return {"context": context, "pooled": pooled}, captions


def conditions(
  config: ml_collections.ConfigDict, num: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The conditioning of `num` samples, and what to store beside them in the .npz
  (labels [num] for class-conditional models, captions [num] for text models)."""
  if data.wants_text(config):
    cond, captions = text_conditions(config, num)
    return cond, {"captions": np.asarray(captions)}
  labels = sample_labels(config, num, seed)
  return {"label": labels}, {"labels": labels}


def make_sampler(exp: Experiment):
  """Returns run(params, cond, indices [B], key) -> images [B, H, W, C] (host numpy),
  sampled with `config.sample`'s sampler, steps and guidance in one jitted call over the mesh.

  The starting noise of image i depends on the seed and i only, not on the batch size or the
  number of devices (so deterministic samplers give the same image i on any topology); the
  stochastic samplers' per-step noise is drawn per batch.
  """
  cfg = exp.config
  scale, steps = cfg.sample.guidance_scale, cfg.sample.num_steps
  sampler = diffusion_lib.resolve_sampler(cfg)
  shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)

  def sample(params, cond, indices, key):
    def apply(z, t, c):
      return exp.model.apply({"params": params}, z, t, c)

    null = exp.conditioner.null(cond)
    denoise = guidance.guided(apply, cond, null, scale, cfg.data.channels)
    noise_key, solver_key = jax.random.split(key)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape))(indices)
    return exp.diffusion.sample(
      denoise,
      noise,
      sampler=sampler,
      num_steps=steps,
      rng=solver_key,
      eta=cfg.sample.eta,
      clip_x0=cfg.sample.clip_denoised,
    )

  batch = parallel.batch_sharding(exp.mesh)
  jitted = jax.jit(
    sample, in_shardings=(exp.param_shardings, batch, batch, None), out_shardings=batch
  )

  def run(params, cond: dict, indices: np.ndarray, key: jax.Array) -> np.ndarray:
    with exp.context():
      cond, indices = jax.device_put(
        jax.tree.map(jnp.asarray, (cond, indices)), parallel.batch_sharding(exp.mesh)
      )
      out = jitted(params, cond, indices, key)
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def generate(
  exp: Experiment,
  params,
  num_images: int,
  *,
  seed: int,
  progress: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Samples `num_images` images (float, [-1, 1] for pixel data) in batches of sample.batch_size;
  returns them and their labels or captions (see `conditions`)."""
  cfg = exp.config
  cond, meta = conditions(cfg, num_images, seed)
  n_dev = parallel.data_parallel_size(exp.mesh)
  batch = -(-min(cfg.sample.batch_size, num_images) // n_dev) * n_dev  # A multiple of devices.
  run = make_sampler(exp)
  key = jax.random.key(seed)
  out = []
  starts = range(0, num_images, batch)
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    starts = tqdm(starts, desc="sampling", unit="batch")
  for start in starts:
    idx = np.arange(start, start + batch)
    rows = idx % num_images  # Wraps around to pad the last batch.
    part = {k: v[rows] for k, v in cond.items()}
    out.append(run(params, part, idx, key)[: num_images - start])
  return np.concatenate(out)[:num_images], meta


def write_samples(
  workdir: str, name: str, images: np.ndarray, meta: dict[str, np.ndarray], pixel: bool
):
  """Writes samples/<name>.npz (arr_0 uint8 NHWC, ADM evaluator layout, plus `labels` or
  `captions`) and a PNG grid."""
  if jax.process_index() != 0:
    return None
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.npz")
  if pixel:
    images_u8 = utils.to_uint8(images)
    np.savez(path, arr_0=images_u8, **meta)
    grid = images_u8[:100]
    utils.save_grid(
      os.path.join(out_dir, f"{name}.png"), grid, upscale=max(1, 128 // images.shape[1])
    )
  else:
    # Latents need the VAE decoder to become images; keep them as floats.
    np.savez(path, latents=images.astype(np.float32), **meta)
  logging.info("Wrote %d samples to %s", len(images), path)
  return path
