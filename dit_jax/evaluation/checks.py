"""The fields of config.sample and config.eval, and of evaluation during training: checked before
anything is built, so that a bad one stops a run at its start and not at its first grid."""

import math
import os

import ml_collections

from dit_jax import config_defaults, data, diffusion, storage
from dit_jax.data import text
from dit_jax.errors import ConfigError, check_choice, check_numbers

# What each number in config.sample and config.eval accepts (see errors.check_numbers);
# sample.guided_channels, whose bound depends on the data, is checked by the sampler.
NUMBERS = (
  ("train.eval_num_images", "> 0", ""),
  ("sample.num_images", "> 0", ""),
  ("sample.batch_size", "> 0", ""),
  ("sample.num_steps", "> 0", " (solver steps)"),
  ("sample.guidance_scale", "a finite number", " (1 = no guidance)"),
  ("sample.eta", "in [0, 1]", " (DDIM's noise: 0 = deterministic, 1 = DDPM's variance)"),
  ("sample.seed", "in [0, 2**32)", ""),
  ("eval.num_images", "> 0", ""),
  ("eval.batch_size", "> 0", " (images per Inception step)"),
)

# The data whose samples --mode=evaluate scores with built-in metrics (no Inception needed).
BUILTIN_METRICS_DATA = ("digits", "shapes")


def _check_output_names(config: ml_collections.ConfigDict) -> None:
  for field in ("sample.name", "eval.name"):
    section, key = field.split(".")
    name = config[section][key]
    if not name.strip() or os.path.basename(name) in ("", ".", ".."):
      raise ConfigError(
        f"config.{field}={name!r} names no file; give the results a name such as "
        f"--config.{field}={config_defaults.base_config()[section][key]}."
      )
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
      raise ConfigError(
        f"config.{field}={name!r} would write outside the workdir; give a name relative to it "
        f"(sub-folders are fine, e.g. --config.{field}=sweep/{os.path.basename(name)})."
      )


def _check_prompts(config: ml_collections.ConfigDict) -> None:
  s = config.sample
  if not data.wants_text(config):
    for field in ("prompts", "prompt_text"):
      if s[field]:
        raise ConfigError(
          f"config.sample.{field}={s[field]!r} is for text models, but "
          f"config.model.name={config.model.name!r} takes class labels; leave it empty and "
          "choose the labels with config.sample.labels ('balanced' or 'random')."
        )
  elif s.prompt_text:
    text.inline_prompts(s.prompt_text)


def check_inception_eval(config: ml_collections.ConfigDict, num_images: int, field: str) -> None:
  """Raises a ConfigError unless the FID Inception can score `num_images` samples of `config`
  (config.`field`): its weights file is given and there, the images number at least 2, and a
  latent model has a VAE to decode its samples with."""
  from dit_jax.models.inception import WEIGHTS_HELP  # Here: only evaluations need it.

  weights = config.eval.inception_weights
  if not weights:
    raise ConfigError(
      f"Scoring the samples of config.data.name={config.data.name!r} (FID, IS, precision, "
      f"recall) takes the FID Inception: set config.eval.inception_weights to {WEIGHTS_HELP} "
      f"(only {' and '.join(BUILTIN_METRICS_DATA)} have built-in metrics without it)."
    )
  if not storage.isfile(weights):
    raise ConfigError(
      f"config.eval.inception_weights={weights!r} does not exist; pass {WEIGHTS_HELP}."
    )
  if num_images < 2:
    raise ConfigError(
      f"config.{field}={num_images} must be at least 2: FID needs the covariance of the samples."
    )
  if not data.is_pixel_data(config) and not config.vae.path:
    raise ConfigError(
      "The model makes latents and config.vae.path is empty, but the FID Inception scores "
      "images: set --config.vae.path=DIR (the diffusers AutoencoderKL whose latents the model "
      "was trained on) to decode the samples."
    )


def _check_guidance(config: ml_collections.ConfigDict) -> None:
  """The guidance family's fields (interval, CADS, classifier, autoguidance); the workdirs they
  name are checked when the sampler loads them (`dit_jax.evaluation.sampling`)."""
  s = config.sample
  interval = tuple(s.guidance_interval)
  unit = "t" if config.diffusion.objective == "rectified_flow" else "EDM sigma"
  if interval:
    ok = len(interval) == 2 and all(
      isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in interval
    )
    if not ok or interval[0] >= interval[1]:
      raise ConfigError(
        f"config.sample.guidance_interval={interval!r} is not an interval (lo, hi] of noise "
        f'levels ({unit}) with 0 <= lo < hi; e.g. --config.sample.guidance_interval="(0.3,3.0)"'
        ", or () to guide at every step."
      )
  c = s.cads
  for name, value, ok, accepted in (
    ("noise_scale", c.noise_scale, c.noise_scale >= 0, ">= 0 (0 = off)"),
    ("tau1", c.tau1, 0 <= c.tau1 <= 1, "in [0, 1]"),
    ("tau2", c.tau2, 0 <= c.tau2 <= 1, "in [0, 1]"),
    ("psi", c.psi, 0 <= c.psi <= 1, "in [0, 1] (the share of the rescaled condition)"),
  ):
    if not (math.isfinite(value) and ok):
      raise ConfigError(f"config.sample.cads.{name}={value} must be {accepted}.")
  if c.tau1 >= c.tau2:
    raise ConfigError(
      f"config.sample.cads.tau1={c.tau1} must be below tau2={c.tau2}: the condition is itself "
      "below tau1 and pure noise above tau2 (e.g. tau1=0.6, tau2=0.9)."
    )
  k = s.classifier
  if not (math.isfinite(k.scale) and k.scale >= 0):
    raise ConfigError(f"config.sample.classifier.scale={k.scale} must be >= 0 (0 = off).")
  if k.scale > 0 and not k.workdir:
    raise ConfigError(
      f"config.sample.classifier.scale={k.scale} needs config.sample.classifier.workdir: the "
      "workdir of a noise-aware classifier (train one with configs/quickstart_classifier.py)."
    )
  if k.scale > 0 and data.wants_text(config):
    raise ConfigError(
      f"config.sample.classifier.scale={k.scale}: classifier guidance steers towards class "
      f"labels, and config.model.name={config.model.name!r} takes text; set it to 0."
    )
  for name, step in (("classifier", k.step), ("guide", s.guide.step)):
    if step < 0:
      raise ConfigError(f"config.sample.{name}.step={step} must be >= 0 (0 = the newest).")
  if s.guide.variant and not s.guide.workdir:
    raise ConfigError(
      f"config.sample.guide.variant={s.guide.variant!r} needs config.sample.guide.workdir, the "
      "workdir of that (weaker) model."
    )


def _check_training_eval(config: ml_collections.ConfigDict) -> None:
  t = config.train
  if not t.eval_every:
    return
  if config.model.name == "classifier":
    raise ConfigError(
      f"config.train.eval_every={t.eval_every} scores samples, but config.model.name="
      "'classifier' makes none; set it 0 and run --mode=evaluate on the workdir for the "
      "classifier's accuracy at several noise levels."
    )
  if t.eval_num_images < 2:
    raise ConfigError(
      f"config.train.eval_num_images={t.eval_num_images} must be at least 2 when "
      f"config.train.eval_every={t.eval_every} (a covariance needs 2 images)."
    )
  # digits and shapes fall back on their built-in metrics; other data need the Inception.
  if config.data.name not in BUILTIN_METRICS_DATA or config.eval.inception_weights:
    check_inception_eval(config, t.eval_num_images, "train.eval_num_images")


def _check_clip_model(config: ml_collections.ConfigDict) -> None:
  path = config.eval.clip_model
  if not path:
    return
  if config.model.name != "mmdit":
    raise ConfigError(
      f"config.eval.clip_model scores samples against their prompts, and "
      f"config.model.name={config.model.name!r} takes none; leave eval.clip_model empty."
    )
  if not storage.isdir(path):
    raise ConfigError(
      f"config.eval.clip_model={path!r} is not a directory; pass a local transformers CLIPModel "
      "directory (e.g. a saved openai/clip-vit-large-patch14; nothing is downloaded)."
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for a field of config.sample or config.eval, or of the evaluation
  during training, that cannot work (the Inception's weights file must be there when a run
  scores during training); the workdirs that guidance names are checked when they are loaded."""
  check_choice(config.sample.labels, ("balanced", "random"), "sample.labels")
  check_numbers(config, NUMBERS)
  _check_output_names(config)
  _check_prompts(config)
  _check_training_eval(config)
  _check_guidance(config)
  _check_clip_model(config)
  diffusion.resolve_sampler(config)
