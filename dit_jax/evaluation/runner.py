"""`--mode=sample` and `--mode=evaluate`: restore EMA parameters onto this mesh, sample, score."""

import json
import os
import time

import jax
import ml_collections
from absl import logging

from dit_jax import checkpoint, data
from dit_jax.errors import ConfigError
from dit_jax.evaluation import sampling
from dit_jax.train import setup


def restore_params(exp: setup.Experiment, workdir: str):
  """The EMA (or raw, per config.sample.use_ema) parameters of the newest checkpoint that can be
  read (a damaged newer one is skipped with a warning), restored onto this experiment's mesh."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, config=exp.config)
  try:
    restored = ckpt.restore_latest_params(exp.abstract_state.params, ema=exp.config.sample.use_ema)
  finally:
    ckpt.close()
  if restored is None:
    raise ConfigError(
      f"No checkpoint in {ckpt.directory}; train first (--mode=train) or point --workdir at a "
      "training run."
    )
  step, params = restored
  checkpoint.log_restore(step, ckpt.directory)
  return params, step


def sample(config: ml_collections.ConfigDict, workdir: str, devices=None) -> str | None:
  """Writes `workdir/samples/<config.sample.name>.npz` and a PNG grid, chunk by chunk, resuming a
  killed run of the same command; returns the npz path (on process 0).

  Latent models' samples are decoded by the VAE of config.vae.path, if set. `devices` (default:
  all) is the mesh to sample on.
  """
  exp = setup.build(config, devices=devices, training=False)
  params, step = restore_params(exp, workdir)
  decoder = sampling.load_decoder(config, exp.mesh)
  if decoder is None and not data.is_pixel_data(config):
    logging.info(
      "The model makes latents and config.vae.path is empty, so latents are written, not images; "
      "to decode them, set --config.vae.path=DIR (a diffusers AutoencoderKL directory)."
    )
  start = time.perf_counter()
  path = sampling.write_samples(
    exp,
    params,
    workdir,
    name=config.sample.name,
    num_images=config.sample.num_images,
    seed=config.sample.seed,
    step=step,
    decoder=decoder,
  )
  logging.info(
    "Sampled %d images at step %d in %.1fs.",
    config.sample.num_images,
    step,
    time.perf_counter() - start,
  )
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Scores conditional samples with the built-in metrics of the data:

  - digits: class accuracy (a classifier trained on the real digits) and a Fréchet distance in
    its feature space;
  - shapes: the fraction of images whose colour, shape and position (read back by
    `shapes_checker`) all match their prompt, by default the captions held out of training.
  """
  if config.data.name not in ("digits", "shapes"):
    raise ConfigError(
      f"--mode=evaluate has built-in metrics for config.data.name='digits' and 'shapes' only "
      f"(got {config.data.name!r}); for other data, run --mode=sample and score the .npz with "
      "the ADM evaluator."
    )
  exp = setup.build(config, training=False)
  params, step = restore_params(exp, workdir)
  start = time.perf_counter()
  images, meta = sampling.generate(exp, params, config.eval.num_images, seed=config.sample.seed)
  results = {"step": step, "num_images": len(images)}
  results["sample_seconds"] = time.perf_counter() - start
  if config.data.name == "digits":
    from dit_jax.evaluation import digits_classifier, metrics

    classifier = digits_classifier.load_classifier()
    real, _ = data.real_images(config)
    mu_r, sig_r = metrics.feature_statistics(classifier.features(real))
    mu_g, sig_g = metrics.feature_statistics(classifier.features(images))
    results["class_accuracy"] = float(metrics.accuracy(classifier.predict(images), meta["labels"]))
    results["frechet_distance"] = float(metrics.frechet_distance(mu_g, sig_g, mu_r, sig_r))
  else:
    from dit_jax.evaluation import shapes_checker

    scores = shapes_checker.score(images, [str(c) for c in meta["captions"]])
    results.update({k: float(v) for k, v in scores.items()})
    results["prompts"] = config.sample.prompts or "held-out captions"
  results.update(
    guidance_scale=config.sample.guidance_scale,
    sampler=config.sample.sampler,
    num_steps=config.sample.num_steps,
  )
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{config.eval.name}.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
