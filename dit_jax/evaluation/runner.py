"""`--mode=sample` and `--mode=evaluate`: restore EMA parameters onto this mesh, sample, score."""

import json
import time

import jax
import ml_collections
from absl import logging

from dit_jax import checkpoint, config_defaults, data, experiment, storage, utils
from dit_jax import diffusion as diffusion_lib
from dit_jax.errors import ConfigError
from dit_jax.evaluation import checks, guides, noisy_accuracy, sampling, scoring
from dit_jax.parallel import distributed

_RETRY = "make room there or make it writable, then rerun the same command."


def _refuse_finished(path: str, parts_dir: str | None = None) -> None:
  """Raises a ConfigError if the scores at `path` are there from a finished earlier run (chunks
  in `parts_dir` beside them mark a run killed after writing it, which a rerun finishes)."""
  if storage.exists(path) and not (parts_dir and storage.isdir(parts_dir)):
    raise ConfigError(
      f"{path} exists (from an earlier run); set another --config.eval.name=..., or pass "
      "--overwrite to replace it."
    )


def _write_scores(path: str, results: dict) -> None:
  storage.write_text(path, json.dumps(results, indent=2))


def run_config(
  workdir: str, given: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """The config to sample or evaluate the run in `workdir` with: the one saved in its newest
  checkpoint (training runs, imports and post-hoc EMA workdirs all save theirs), so that no
  config file or training flag has to be repeated; with `given` (a --config passed alongside)
  setting what `config_defaults.for_saved_run` lets it set. Without a checkpoint, `given`.

  Raises:
    ConfigError: no checkpoint and no `given`; or `given` changes the model, naming the field.
  """
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    saved = None
    for step in reversed(ckpt.all_steps()):
      saved = ckpt.saved_config(step)
      if saved is not None:
        break
  finally:
    ckpt.close()
  if saved is None:
    if given is not None:
      return given
    raise ConfigError(
      f"No checkpoint with its config in {ckpt.directory}: pass the run's --config, or point "
      "--workdir at a training run (or train first with --mode=train)."
    )
  return config_defaults.for_saved_run(config_defaults.from_saved(saved), given, ckpt.directory)


def restore_params(exp: experiment.Experiment, workdir: str):
  """The EMA (or raw, per config.sample.use_ema) parameters of the newest checkpoint that can be
  read (a damaged newer one is skipped with a warning), restored onto this experiment's mesh; of
  a checkpoint with several power EMAs, the one at config.sample.ema_index."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, config=exp.config)
  try:
    restored = ckpt.restore_latest_params(
      exp.abstract_state.params,
      ema=exp.config.sample.use_ema,
      ema_index=exp.config.sample.ema_index,
    )
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


def sample(
  config: ml_collections.ConfigDict, workdir: str, devices=None, *, overwrite: bool = False
) -> str | None:
  """Writes `workdir/samples/<config.sample.name>.npz` and a PNG grid, chunk by chunk, resuming a
  killed run of the same command; returns the npz path (on process 0).

  Latent models' samples are decoded by the VAE of config.vae.path, if set. `devices` (default:
  all) is the mesh to sample on.

  Raises:
    ConfigError: among others, if samples of that name are there from a finished run and not
      `overwrite` (checked first, before anything is built or written).
  """
  if config.model.name == "classifier":
    raise ConfigError(
      f"{workdir} is a run of config.model.name='classifier', which makes no images; sample the "
      "diffusion model's workdir (with this one as its guidance classifier), or run "
      "--mode=evaluate here for the classifier's accuracy at several noise levels."
    )
  checks.check_config(config)
  name = config.sample.name
  npz, png, _ = sampling.sample_files(workdir, name)
  if not overwrite:
    distributed.on_process_0(
      lambda: sampling.check_new_samples(workdir, name), f"read {workdir}", _RETRY
    )
  exp = experiment.build(config, devices=devices, training=False)
  params, step = restore_params(exp, workdir)
  decoder = sampling.load_decoder(config, exp.mesh)
  pixels = decoder is not None or data.is_pixel_data(config)
  if not pixels:
    logging.info(
      "The model makes latents and config.vae.path is empty, so latents are written, not images; "
      "to decode them, set --config.vae.path=DIR (a diffusers AutoencoderKL directory)."
    )
  start = time.perf_counter()
  path = sampling.write_samples(
    exp,
    params,
    workdir,
    name=name,
    num_images=config.sample.num_images,
    seed=config.sample.seed,
    step=step,
    decoder=decoder,
    overwrite=overwrite,
  )
  if jax.process_index() == 0:
    seconds, n = time.perf_counter() - start, config.sample.num_images
    if pixels:
      grid = f"a grid of the first {min(sampling.GRID_IMAGES, n)} to {png}"
      logging.info("Wrote %d samples (step %d, %.1fs) to %s and %s.", n, step, seconds, npz, grid)
    else:
      logging.info(
        "Wrote %d samples (latents; step %d, %.1fs) to %s, and no image grid (config.vae.path "
        "is empty).",
        n,
        step,
        seconds,
        npz,
      )
  return path


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> dict[str, float]:
  """Scores the samples of the newest checkpoint and writes the scores and the sampling settings
  used to `workdir/eval/<config.eval.name>.json`.

  - digits and shapes: their built-in metrics (`scoring.builtin_scorer`) of config.eval.num_images
    conditional samples; and, if config.eval.inception_weights is set, also the FID Inception's
    scores below, of the same samples.
  - any other data: the FID Inception's `fid`, `sfid`, `inception_score`, `precision` and
    `recall` of config.eval.num_images samples (decoded by the VAE of config.vae.path for latent
    models) against config.eval.reference, or the statistics of the config's own data (see
    `scoring`). The samples are featurized chunk by chunk into `eval/<name>.parts`, so that a
    killed evaluation resumes after its last whole chunk when rerun, and gives the same scores.

  Raises:
    ConfigError: among others, if that json is there from a finished run and not `overwrite`
      (checked first, before anything is built or written), or if the Inception is needed and
      config.eval.inception_weights is not given.
  """
  if config.model.name == "classifier":
    return _evaluate_classifier(config, workdir, overwrite=overwrite)
  checks.check_config(config)
  builtin = config.data.name in checks.BUILTIN_METRICS_DATA
  inception = bool(config.eval.inception_weights) or not builtin
  if inception:
    checks.check_inception_eval(config, config.eval.num_images, "eval.num_images")
  path, parts_dir = scoring.eval_files(workdir, config.eval.name)

  if not overwrite:
    distributed.on_process_0(lambda: _refuse_finished(path, parts_dir), f"read {workdir}", _RETRY)
  exp = experiment.build(config, training=False)
  params, step = restore_params(exp, workdir)
  scorer = scoring.Scorer(exp, workdir) if inception else None
  num = config.eval.num_images
  start = time.perf_counter()
  results = {"step": step, "num_images": num}
  if builtin:
    images, meta = sampling.generate(exp, params, num, seed=config.sample.seed)
    results["sample_seconds"] = time.perf_counter() - start
    results.update(scoring.builtin_scorer(config)(images, meta))
    if config.data.name == "shapes":
      results["prompts"] = config.sample.prompts or "held-out captions"
    uint8 = utils.to_uint8(images)
    scores = scorer.score_images(uint8) if scorer else None
    if config.eval.clip_model:
      from dit_jax.evaluation import clip_score

      cs = scorer.clip if scorer else clip_score.ClipScorer.load(config.eval.clip_model, exp.mesh)
      results.update(cs.score(cs.image_features(uint8), meta["captions"]))
  else:
    scores = scorer.score(
      params, step=step, num_images=num, parts_dir=parts_dir, overwrite=overwrite
    )
    results["sample_seconds"] = time.perf_counter() - start
  results.update(scores or {})
  # The settings as sampled with ("auto" resolved), so that the scores say what made them.
  results.update(
    sampler=diffusion_lib.resolve_sampler(config),
    num_steps=config.sample.num_steps,
    guidance_scale=config.sample.guidance_scale,
    guided_channels=guides.guided_channels(config),
    eta=config.sample.eta,
    seed=config.sample.seed,
    use_ema=config.sample.use_ema,
  )
  s = config.sample
  if s.guidance_interval and s.guidance_scale != 1.0:
    results["guidance_interval"] = list(s.guidance_interval)
    results["network_passes"] = guides.interval_passes(
      config, exp.diffusion.at_size(*sampling.sample_size(config))
    )
  if s.cads.noise_scale > 0:
    results["cads"] = s.cads.to_dict()
  if s.classifier.scale > 0:
    results["classifier"] = s.classifier.to_dict()
  if s.guide.workdir and s.guidance_scale != 1.0:
    results["guide"] = s.guide.to_dict()

  distributed.on_process_0(lambda: _write_scores(path, results), f"write {path}", _RETRY)
  if scorer is not None:
    scorer.finish(parts_dir)
  if jax.process_index() == 0:
    logging.info("Wrote the scores of %d images at step %d to %s.", num, step, path)
  return results


def _evaluate_classifier(
  config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool
) -> dict[str, float]:
  """--mode=evaluate of a classifier run: its accuracy on up to config.eval.num_images images of
  config.data (config.data.split; evenly spaced, so class-sorted data stays balanced) noised to
  the levels of `noisy_accuracy.UNIT_TIMES`, written to `workdir/eval/<config.eval.name>.json`."""
  path, _ = scoring.eval_files(workdir, config.eval.name)

  if not overwrite:
    distributed.on_process_0(lambda: _refuse_finished(path), f"read {workdir}", _RETRY)
  exp = experiment.build(config, training=False)
  params, step = restore_params(exp, workdir)
  images, labels = data.real_images(config, config.eval.num_images)
  results = {"step": step, "num_images": len(images), "data_split": config.data.split}
  results.update(
    noisy_accuracy.noisy_accuracy(
      exp,
      params,
      images,
      labels,
      seed=config.sample.seed,
      batch_size=config.eval.batch_size,
    )
  )
  results.update(seed=config.sample.seed, use_ema=config.sample.use_ema)

  distributed.on_process_0(lambda: _write_scores(path, results), f"write {path}", _RETRY)
  if jax.process_index() == 0:
    logging.info("Wrote the classifier's accuracies at step %d to %s.", step, path)
  return results
