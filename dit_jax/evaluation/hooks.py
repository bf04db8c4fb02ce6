"""The training loop's one hook into sampling and evaluation (`train.loop.Hooks`): the image
grids and the evaluations during training, which share one compiled sampler and one VAE. The
entry point builds it (`TrainingHooks(workdir)`) and hands it to `loop.run`."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from dit_jax import data, experiment, storage, utils
from dit_jax.data import buckets
from dit_jax.evaluation import checks, sampling
from dit_jax.evaluation.scoring import (
  TRAINING_PARTS,
  Scorer,
  builtin_scorer,
  eval_files,
  params_checksum,
)


def grid_sampler(
  exp: experiment.Experiment, run: Callable, decoder: Any
) -> Callable[[Any], dict[str, np.ndarray] | None]:
  """Returns grid(params) -> {suffix: uint8 [n, H, W, 3 or 1]}, the first min(100,
  sample.num_images) samples as pixels at config.sample.size ("" suffix), or with
  config.data.buckets and no sample.size at every bucket's size ("_<H>x<W>" suffixes); None for a
  model that makes none (a noise-aware classifier, or a latent model without a VAE). `run`: a
  `sampling.make_sampler(exp)`, compiled on the first call; `decoder`: the VAE to decode latents
  with (`sampling.load_decoder`), or None."""
  cfg = exp.config
  if cfg.model.name == "classifier":  # A noise-aware classifier makes no images.
    return lambda params: None
  if decoder is None and not data.is_pixel_data(cfg):
    logging.info(
      "The model makes latents and config.vae.path is empty, so training writes no image grids; "
      "to decode them, set --config.vae.path=DIR (a diffusers AutoencoderKL directory)."
    )
    return lambda params: None
  n = min(sampling.GRID_IMAGES, cfg.sample.num_images)
  runs = {"": run}
  if cfg.data.buckets and not cfg.sample.size:
    runs = {
      f"_{h}x{w}": sampling.make_sampler(exp, (h, w)) for h, w in buckets.parse(cfg.data.buckets)
    }

  def grid(params) -> dict[str, np.ndarray]:
    out = {}
    for suffix, one in runs.items():
      images, _ = sampling.generate(
        exp, params, n, seed=cfg.sample.seed, progress=False, decoder=decoder, run=one
      )
      out[suffix] = utils.to_uint8(images)
    return out

  return grid


def training_evaluator(
  exp: experiment.Experiment, workdir: str, run: Callable, decoder: Any
) -> Callable[[Any, int], dict[str, float]] | None:
  """The evaluation during training, for `config.train.eval_every` > 0 (None when it is 0):
  evaluate(ema_params, step) -> the scores to log (on process 0; {} on the others).

  The samples are those of --mode=evaluate (config.sample's settings and seed), train.
  eval_num_images of them: scored with the FID Inception if config.eval.inception_weights is
  set, and, for digits and shapes, with their built-in metrics (all they get without weights).
  Nothing of the training state but the parameters is read, and no randomness but
  config.sample.seed's is drawn. The Inception and the reference are built now, before the first
  step. The chunks of an evaluation are kept in eval/during_training.parts, keyed by the step and
  a checksum of the parameters, until its scores are returned. `run`: the
  `sampling.make_sampler(exp)` the grids use; `decoder`: the VAE they decode with, or None.
  """
  cfg = exp.config
  if not cfg.train.eval_every:
    return None
  num = cfg.train.eval_num_images
  scorer = None
  if cfg.eval.inception_weights:
    scorer = Scorer(exp, workdir, run=run, progress=False, decoder=decoder)
  builtin = builtin_scorer(cfg) if cfg.data.name in checks.BUILTIN_METRICS_DATA else None
  _, parts_dir = eval_files(workdir, TRAINING_PARTS)

  def evaluate(params, step: int) -> dict[str, float]:
    scores = {}
    if builtin is not None:
      images, meta = sampling.generate(
        exp, params, num, seed=cfg.sample.seed, progress=False, run=run
      )
      scores.update(builtin(images, meta))
      if scorer is not None:
        scores.update(scorer.score_images(utils.to_uint8(images)) or {})
    else:
      checksum = params_checksum(params)
      inception = scorer.score(
        params,
        step=step,
        num_images=num,
        parts_dir=parts_dir,
        overwrite=True,  # Chunks of an earlier evaluation there are stale.
        fingerprint={"params_checksum": checksum},
      )
      scorer.finish(parts_dir)
      scores.update(inception or {})
    if jax.process_index() != 0:
      return {}
    return {
      k: float(v)
      for k, v in scores.items()
      if isinstance(v, int | float) and k != "num_reference" and v is not None
    }

  return evaluate


class TrainingHooks:
  """The grids and evaluations of a training run in `workdir` (`train.loop.Hooks`).

  `start` checks config.sample and config.eval, then builds, before the first step, one sampler
  and one VAE for both, then the Inception and the reference of an evaluation, so that a bad file
  or setting stops the run before it trains.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._grid = self._evaluate = None

  def start(self, exp: experiment.Experiment) -> None:
    cfg = exp.config
    run = sampling.make_sampler(exp)  # (Which checks config.sample and config.eval first.)
    # (A noise-aware classifier makes no images to decode.)
    decoder = None if cfg.model.name == "classifier" else sampling.load_decoder(cfg, exp.mesh)
    self._grid = grid_sampler(exp, run, decoder)
    self._evaluate = training_evaluator(exp, self.workdir, run, decoder)

  def grid(self, ema_params, step: int, writer: utils.MetricWriter) -> str | None:
    """Writes images/step_<step>.png (with buckets: step_<step>_<H>x<W>.png for each) and a
    TensorBoard image of the grid of `ema_params` (pixels, decoded for latent models); returns
    the (first) PNG's path, or None if the model makes no pixels."""
    grids = self._grid(ema_params)
    if grids is None:
      return None
    paths = []
    for suffix, u8 in grids.items():
      paths.append(storage.join(self.workdir, "images", f"step_{step:07d}{suffix}.png"))
      if jax.process_index() == 0:
        upscale = max(1, 128 // min(u8.shape[1:3]))
        utils.save_grid(paths[-1], u8, upscale=upscale)
        writer.write_image(step, "samples" + suffix, utils.image_grid(u8))
    return paths[0]

  def evaluate(self, ema_params, step: int) -> dict[str, float] | None:
    return None if self._evaluate is None else self._evaluate(ema_params, step)
