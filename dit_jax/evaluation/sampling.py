"""Class-conditional sampling with guidance: the whole solver loop in one jitted call."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import diffusion as diffusion_lib
from dit_jax import parallel, utils
from dit_jax.diffusion import guidance
from dit_jax.train.setup import Experiment


def sample_labels(config: ml_collections.ConfigDict, num: int, seed: int) -> np.ndarray:
  """Balanced (0, 1, ..., K-1, 0, 1, ...) or uniformly random class labels [num]."""
  k = config.model.num_classes
  if config.sample.labels == "balanced":
    return (np.arange(num) % k).astype(np.int32)
  return np.random.default_rng(seed).integers(0, k, num).astype(np.int32)


def make_sampler(exp: Experiment):
  """Returns run(params, labels [B], indices [B], key) -> images [B, H, W, C] (host numpy),
  sampled with `config.sample`'s sampler, steps and guidance in one jitted call over the mesh.

  The starting noise of image i depends on the seed and i only, not on the batch size or the
  number of devices (so deterministic samplers give the same image i on any topology); the
  stochastic samplers' per-step noise is drawn per batch.
  """
  cfg = exp.config
  scale, steps = cfg.sample.guidance_scale, cfg.sample.num_steps
  sampler = diffusion_lib.resolve_sampler(cfg)
  shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)

  def sample(params, labels, indices, key):
    def apply(z, t, y):
      return exp.model.apply({"params": params}, z, t, y, train=False)

    denoise = guidance.guided(apply, labels, cfg.model.num_classes, scale, cfg.data.channels)
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

  def run(params, labels: np.ndarray, indices: np.ndarray, key: jax.Array) -> np.ndarray:
    with exp.context():
      labels, indices = (
        jax.device_put(jnp.asarray(a), parallel.batch_sharding(exp.mesh)) for a in (labels, indices)
      )
      out = jitted(params, labels, indices, key)
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def generate(
  exp: Experiment,
  params,
  num_images: int,
  *,
  seed: int,
  progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Samples `num_images` images (float, [-1, 1] for pixel data) in batches of sample.batch_size."""
  cfg = exp.config
  labels = sample_labels(cfg, num_images, seed)
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
    lab = np.resize(labels[start : start + batch], batch)  # Pads the last batch.
    out.append(run(params, lab, idx, key)[: num_images - start])
  return np.concatenate(out)[:num_images], labels


def write_samples(workdir: str, name: str, images: np.ndarray, labels: np.ndarray, pixel: bool):
  """Writes samples/<name>.npz (arr_0 uint8 NHWC + labels, ADM evaluator layout) and a PNG grid."""
  if jax.process_index() != 0:
    return None
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.npz")
  if pixel:
    images_u8 = utils.to_uint8(images)
    np.savez(path, arr_0=images_u8, labels=labels)
    grid = images_u8[:100]
    utils.save_grid(
      os.path.join(out_dir, f"{name}.png"), grid, upscale=max(1, 128 // images.shape[1])
    )
  else:
    # Latents need the VAE decoder to become images; keep them as floats.
    np.savez(path, latents=images.astype(np.float32), labels=labels)
  logging.info("Wrote %d samples to %s", len(images), path)
  return path
