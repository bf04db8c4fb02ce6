"""Conditional sampling with guidance (class labels or text), the whole solver loop in one jitted
call; latent models' samples are decoded to pixels by the VAE of `config.vae.path`.

`write_samples` produces the ADM evaluator's `samples/<name>.npz` in chunks of
`config.sample.batch_size` images: process 0 writes each finished chunk to
`samples/<name>.parts/<start>-<end>.npy` (under a temporary name, then renamed, so a file there is
always whole), beside `fingerprint.json`, which records everything the images depend on. A killed
run rerun with the same command continues after the last chunk on disk; with another config it
stops with an error rather than mix images of two configs. At the end the chunks are streamed
into the .npz (never all in memory) and removed.

Samples of an earlier run are not replaced unless asked (`overwrite`): a finished
`samples/<name>.npz` (or its PNG) stops a new run of that name at once, while a `.parts` directory
marks an unfinished run, which a rerun finishes whatever `overwrite` says.
"""

import hashlib
import json
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import data, parallel, storage, utils
from dit_jax import diffusion as diffusion_lib
from dit_jax.data import buckets
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.evaluation import checks, guides
from dit_jax.evaluation.conditions import Conditions, conditions
from dit_jax.experiment import Experiment
from dit_jax.parallel import distributed

GRID_IMAGES = 100  # Images in a PNG grid.
_CADS_STREAM = 3  # fold_in(seed key, this) seeds CADS's condition noise (apart from the solver's).
FINGERPRINT_FILE = storage.ChunkStore.FINGERPRINT


def sample_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(H, W) the model samples at: config.sample.size, or config.data.image_size square."""
  sizes = buckets.parse(config.sample.size, "config.sample.size")
  if len(sizes) > 1:
    raise ConfigError(
      f"config.sample.size={config.sample.size!r} lists {len(sizes)} sizes; give one HxW (run "
      "once per size)."
    )
  if sizes and config.model.name != "mmdit" and sizes[0] != (config.data.image_size,) * 2:
    raise ConfigError(
      f"config.sample.size={config.sample.size!r}: config.model.name={config.model.name!r} "
      f"samples at config.data.image_size={config.data.image_size} only; set "
      "config.sample.size=''."
    )
  return sizes[0] if sizes else (config.data.image_size, config.data.image_size)


def make_sampler(exp: Experiment, size: tuple[int, int] | None = None):
  """Returns run(params, cond, indices [B], key, gather=True) -> samples [B, H, W, C], host numpy
  on every process (with gather=False: the global array, split over the mesh's data axes as it was
  sampled), sampled with `config.sample`'s sampler, steps and guidance in one jitted call over the
  mesh, at `size` (H, W) (default `sample_size(config)`).

  Guidance: classifier-free at `guidance_scale`, optionally only inside `guidance_interval`, with
  CADS (`sample.cads`), with autoguidance's guide model in place of the unconditional pass
  (`sample.guide`), and with classifier guidance (`sample.classifier`); the guide's and the
  classifier's parameters are restored here, onto the same mesh.

  The starting noise of sample i depends on the seed and i only, so the deterministic samplers
  give the same sample i in any batch and on any topology (CADS's condition noise likewise). The
  stochastic samplers' per-step noise is drawn for the whole batch from the seed and the batch's
  first index; JAX's partitionable threefry makes row j of a draw the same for any number of rows
  beyond it and any sharding, so their sample i depends on the seed, i and the chunk size (not the
  padding, nor the devices).
  """
  checks.check_config(exp.config)
  cfg = exp.config
  scale, steps = cfg.sample.guidance_scale, cfg.sample.num_steps
  sampler = diffusion_lib.resolve_sampler(cfg)
  n_guided = guides.guided_channels(cfg)
  height, width = size or sample_size(cfg)
  shape = (height, width, cfg.data.channels)
  diff = exp.diffusion.at_size(height, width)  # The time shift of this size.
  schedule = diff.schedule
  text_model = data.wants_text(cfg)
  guide = guides.load_guide(cfg, exp.mesh)
  classifier = guides.load_classifier(cfg, exp.mesh)
  c = cfg.sample.cads
  cads = None
  if c.noise_scale > 0:
    cads = guidance.CADS(c.noise_scale, c.tau1, c.tau2, c.psi, c.rescale)
  interval = tuple(cfg.sample.guidance_interval) if scale != 1.0 else ()
  passes = guides.interval_passes(cfg, diff)
  if passes is not None and passes["guided"] in (0, passes["evaluations"]):
    # The grid lies wholly inside or outside: no branch at run time, the same program as
    # guiding everywhere (or nowhere, scale 1).
    interval, scale = (), scale if passes["guided"] else 1.0
    if not passes["guided"] and jax.process_index() == 0:
      logging.warning(
        "config.sample.guidance_interval=%s holds none of the sampler's noise levels: sampling "
        "is unguided.",
        cfg.sample.guidance_interval,
      )
  if passes is not None and jax.process_index() == 0:
    logging.info(
      "Guidance interval %s: %d of %d network evaluations guided, %d network passes per image "
      "instead of %d (%d unconditional passes saved).",
      interval,
      passes["guided"],
      passes["evaluations"],
      passes["passes"],
      2 * passes["evaluations"],
      passes["saved"],
    )

  def applier(model, params):
    def apply(z, t, cond, perturb=None):
      if perturb is None:
        return model.apply({"params": params}, z, t, cond)
      if text_model:  # CADS perturbs the text embeddings themselves.
        return model.apply({"params": params}, z, t, perturb(cond))
      return model.apply({"params": params}, z, t, cond, label_embedding_fn=perturb)

    return apply

  def sample(params, aux, cond, indices, key):
    guide_params, classifier_params = aux
    null = exp.conditioner.null(cond)
    noise_key, solver_key = jax.random.split(key)
    perturbation = in_interval = guide_apply = classifier_grad = None
    if cads is not None:
      cads_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, _CADS_STREAM), i))(
        indices
      )

      def perturbation(model_time):
        unit = schedule.unit_time(model_time)
        return guidance.cads_perturbation(cads, unit, cads_keys, model_time)

    if interval:

      def in_interval(model_time):
        level = schedule.noise_level(model_time)
        return (level > interval[0]) & (level <= interval[1])

    if guide is not None:
      guide_apply = applier(guide.exp.model, guide_params)
    if classifier is not None:
      classifier_grad = guides.classifier_gradient(
        classifier.exp.model, classifier_params, cond["label"], cfg.sample.classifier.scale
      )

    denoise = guidance.guided(
      applier(exp.model, params),
      cond,
      null,
      scale,
      n_guided,
      in_interval=in_interval,
      perturbation=perturbation,
      guide_apply=guide_apply,
    )
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape))(indices)
    return diff.sample(
      denoise,
      noise,
      sampler=sampler,
      num_steps=steps,
      rng=jax.random.fold_in(solver_key, indices[0]),
      eta=cfg.sample.eta,
      clip_x0=cfg.sample.clip_denoised,
      classifier_grad=classifier_grad,
    )

  aux = (
    None if guide is None else guide.params,
    None if classifier is None else classifier.params,
  )
  aux_shardings = (
    None if guide is None else guide.exp.param_shardings,
    None if classifier is None else classifier.exp.param_shardings,
  )
  batch = parallel.batch_sharding(exp.mesh)
  jitted = jax.jit(
    sample,
    in_shardings=(exp.param_shardings, aux_shardings, batch, batch, None),
    out_shardings=batch,
  )

  def run(params, cond: dict, indices: np.ndarray, key: jax.Array, gather: bool = True):
    with exp.context():
      cond, indices = jax.device_put(
        jax.tree.map(jnp.asarray, (cond, indices)), parallel.batch_sharding(exp.mesh)
      )
      out = jitted(params, aux, cond, indices, key)
    if not gather:
      return out
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))

  return run


def load_decoder(config: ml_collections.ConfigDict, mesh):
  """The VAE (dit_jax.vae.VAE) that decodes this latent model's samples, or None: for pixel
  models, and for latent models without config.vae.path.

  Raises:
    ConfigError: the VAE's latent channels or scaling factor do not match the model's data.
  """
  if data.is_pixel_data(config):
    if config.vae.path:
      logging.warning(
        "config.vae.path=%r is not used: the model makes pixels (config.data.name=%r).",
        config.vae.path,
        config.data.name,
      )
    return None
  if not config.vae.path:
    return None
  from dit_jax.vae import VAE

  vae = VAE.load(config.vae.path, mesh, config.vae.dtype)
  where = f"the VAE in config.vae.path={config.vae.path!r}"
  if vae.config.latent_channels != config.data.channels:
    raise ConfigError(
      f"{where} has {vae.config.latent_channels} latent channels but the model makes "
      f"config.data.channels={config.data.channels}; use the VAE whose latents the model was "
      "trained on."
    )
  scale, vae_scale = config.data.latent_scale, vae.config.scaling_factor
  if not math.isclose(scale, vae_scale, rel_tol=1e-6):
    raise ConfigError(
      f"config.data.latent_scale={scale} but {where} scales latents by scaling_factor="
      f"{vae_scale}: the model was trained on latents of another scale than this VAE decodes; "
      f"set --config.data.latent_scale={vae_scale} if that is the scale the model was trained "
      "with, else use the VAE (or retrain on latents) of the model's own scale."
    )
  return vae


def chunk_size(config: ml_collections.ConfigDict, num_images: int) -> int:
  """Images per chunk: config.sample.batch_size, at most num_images. Each chunk is one jitted
  call, padded to a multiple of the data-parallel devices."""
  return min(config.sample.batch_size, num_images)


def _stochastic(config: ml_collections.ConfigDict) -> bool:
  """Whether the sampler draws noise at every step (then samples depend on the chunk size)."""
  sampler = diffusion_lib.resolve_sampler(config)
  return sampler == "ddpm" or (sampler == "ddim" and config.sample.eta > 0)


def sample_chunks(
  exp: Experiment,
  run,
  params,
  conds: Conditions,
  num_images: int,
  *,
  seed: int,
  first: int = 0,
  decoder=None,
  gather: bool = True,
) -> Iterator[tuple[int, np.ndarray | jax.Array]]:
  """Yields (start, samples [<= chunk, H, W, C]) for the chunks from `first` on; decoded to
  pixels if a decoder is given.

  With gather=False the samples stay on the devices that made them (and are decoded there): a
  global array [padded chunk, H, W, C] split over the mesh's data axes, whose first
  min(chunk, num_images - start) rows are the samples.
  """
  batch = chunk_size(exp.config, num_images)
  n_dev = parallel.data_parallel_size(exp.mesh)
  padded = -(-batch // n_dev) * n_dev
  key = jax.random.key(seed)
  for start in range(first, num_images, batch):
    # Padding rows (the next indices, conditions wrapped around) are sampled and dropped.
    indices = np.arange(start, start + padded)
    out = run(params, conds.take(indices % num_images), indices, key, gather=gather)
    if not gather:
      yield start, (out if decoder is None else decoder.decode_sharded(out))
      continue
    out = out[: min(batch, num_images - start)]
    yield start, (out if decoder is None else decoder.decode(out))


def _progress(total: int, initial: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, desc="sampling", unit="img", dynamic_ncols=True)


def generate(
  exp: Experiment,
  params,
  num_images: int,
  *,
  seed: int,
  progress: bool = True,
  decoder=None,
  run=None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Samples `num_images` in memory, in chunks of sample.batch_size: images in about [-1, 1]
  (pixel models, or latent models with a `decoder`, see `load_decoder`) or latents, and their
  labels or captions. `run` reuses a `make_sampler(exp)` (compiled once)."""
  conds = conditions(exp.config, num_images, seed)
  run = run or make_sampler(exp)
  bar = _progress(num_images, 0, progress)
  out = []
  for _, chunk in sample_chunks(exp, run, params, conds, num_images, seed=seed, decoder=decoder):
    out.append(chunk)
    if bar is not None:
      bar.update(len(chunk))
  if bar is not None:
    bar.close()
  return np.concatenate(out), conds.meta


def fingerprint(
  config: ml_collections.ConfigDict,
  *,
  step: int,
  num_images: int,
  seed: int,
  key: str,
  meta: dict[str, np.ndarray],
) -> dict:
  """Everything the samples depend on, as JSON values; chunks of two runs may be put together
  only if their fingerprints are equal. The mesh may differ, and so may the chunk size
  (sample.batch_size) but for the stochastic samplers, whose images depend on it."""
  c = config.to_dict()
  out = {"checkpoint_step": int(step), "stored_as": key}
  layout = ("model.remat", "model.scan_unroll", "sample.name", "sample.batch_size")
  for section in ("model", "diffusion", "sample", "vae"):
    out.update({f"{section}.{k}": v for k, v in c[section].items()})
  out = {k: v for k, v in out.items() if k not in layout}
  if _stochastic(config):
    out["sample.batch_size"] = chunk_size(config, num_images)
  out.update({"sample.num_images": num_images, "sample.seed": seed})
  out["sample.sampler"] = diffusion_lib.resolve_sampler(config)
  for k in ("name", "image_size", "channels", "latent_scale"):
    out[f"data.{k}"] = c["data"][k]
  digest = hashlib.sha256()
  for k in sorted(meta):
    digest.update(k.encode())
    digest.update(np.ascontiguousarray(meta[k]).tobytes())
  out["conditions_sha256"] = digest.hexdigest()
  return json.loads(json.dumps(out))  # Tuples as lists, as they read back.


def sample_files(workdir: str, name: str) -> tuple[str, str, str]:
  """(npz, png grid, chunk directory) of the samples named `name` in `workdir`."""
  out_dir = storage.join(workdir, "samples")
  return tuple(storage.join(out_dir, f"{name}{ext}") for ext in (".npz", ".png", ".parts"))


def check_new_samples(workdir: str, name: str) -> None:
  """Raises a ConfigError if samples named `name` are already in `workdir` from a finished run.

  An unfinished run's chunk directory is no obstacle: rerunning the command finishes it (and a
  run killed while it wrote its .npz has both).
  """
  npz, png, parts_dir = sample_files(workdir, name)
  done = [p for p in (npz, png) if storage.isfile(p)]
  if done and not storage.isdir(parts_dir):
    raise ConfigError(
      f"{done[0]} exists (from an earlier run); set another --config.sample.name=..., or pass "
      "--overwrite to replace it."
    )


def write_samples(
  exp: Experiment,
  params,
  workdir: str,
  *,
  name: str,
  num_images: int,
  seed: int,
  step: int,
  decoder=None,
  progress: bool = True,
  run=None,
  overwrite: bool = False,
) -> str | None:
  """Samples `num_images` chunk by chunk into `workdir/samples/<name>.npz` and a PNG grid of the
  first 100, resuming a killed run of the same config (see the module docstring).

  The .npz holds `arr_0` uint8 [N, H, W, C] (pixel models, or latent models with a `decoder`) or
  `latents` float32 [N, h, w, c], and `labels` or `captions` [N]. Every process takes part;
  process 0 writes and returns the path (None on the others). `run` reuses a
  `make_sampler(exp)`.

  Raises:
    ConfigError: the samples `name` are there from a finished run (unless `overwrite`, which
      replaces them once the new ones are whole), or chunks of another config are (which
      `overwrite` removes).
  """
  cfg = exp.config
  proc0 = jax.process_index() == 0
  pixels = decoder is not None or data.is_pixel_data(cfg)
  key, dtype = ("arr_0", np.uint8) if pixels else ("latents", np.float32)
  conds = conditions(cfg, num_images, seed)
  path, png, parts_dir = sample_files(workdir, name)
  want = fingerprint(cfg, step=step, num_images=num_images, seed=seed, key=key, meta=conds.meta)
  run = run or make_sampler(exp)
  (height, width), channels = sample_size(cfg), cfg.data.channels
  if decoder is not None:
    f = decoder.downsample_factor
    height, width, channels = height * f, width * f, decoder.config.out_channels
  # Process 0 writes; its file errors stop every process (see distributed.on_process_0).
  retry = "make room there or make it writable, then rerun the same command, which resumes."

  store = storage.ChunkStore(parts_dir, (height, width, channels), dtype)

  def prepare() -> int:
    if not overwrite:
      check_new_samples(workdir, name)
    return store.resume(want, overwrite=overwrite)

  first = distributed.on_process_0(prepare, f"prepare {parts_dir}", retry)
  if first:
    logging.info("Resuming: %d of %d samples are in %s.", first, num_images, parts_dir)
  bar = _progress(num_images, first, progress)
  try:
    for start, chunk in sample_chunks(
      exp, run, params, conds, num_images, seed=seed, first=first, decoder=decoder
    ):

      def write_part(start=start, chunk=chunk) -> None:
        store.put(start, utils.to_uint8(chunk) if pixels else np.asarray(chunk, np.float32))

      distributed.on_process_0(write_part, f"write the samples into {parts_dir}", retry)
      if bar is not None:
        bar.update(len(chunk))
  finally:
    if bar is not None:  # Closed before an error, which is then the last line of output.
      bar.close()

  def finish() -> None:
    shape = (num_images, height, width, channels)
    storage.write_npz_streamed(path, key, store.arrays(), shape, dtype, conds.meta)
    if pixels:
      grid, got = [], 0
      for chunk in store.arrays():
        grid.append(chunk[: GRID_IMAGES - got])
        got += len(grid[-1])
        if got == GRID_IMAGES:
          break
      grid = np.concatenate(grid)
      utils.save_grid(png, grid, upscale=max(1, 128 // grid.shape[1]))
    else:
      storage.remove(png)  # The grid of the samples just replaced, if any.
    store.remove()

  distributed.on_process_0(finish, f"write {path}", retry)
  return path if proc0 else None
