"""The one check of a whole config, which the entry points run before anything is built: each
package checks its own fields (`experiment.check_config` those of the parts it builds, the loop
the training schedule's, `evaluation.checks` sampling's and scoring's); then each legal setting
that is probably a mistake is one warning."""

import jax
import ml_collections
from absl import logging

from dit_jax import config_defaults, data, experiment
from dit_jax import diffusion as diffusion_lib
from dit_jax.evaluation import checks as evaluation_checks
from dit_jax.train import loop


def unusual_settings(config: ml_collections.ConfigDict) -> list[str]:
  """One sentence for each legal setting in a valid `config` that is probably a mistake: guidance
  that cannot work as meant, or a field changed from its base_config() default that the chosen
  parts never read."""
  default = config_defaults.base_config()
  d, m, s = config.diffusion, config.model, config.sample
  out = []

  def unused(section: str, names: tuple[str, ...], reader: str, setting: str) -> None:
    for name in names:
      value = config[section][name]
      if value != default[section][name]:
        out.append(
          f"config.{section}.{name}={value!r} has no effect: only {reader} reads it, and {setting}."
        )

  g = s.guidance_scale
  if g < 0:
    out.append(
      f"config.sample.guidance_scale={g} is negative, which steers samples away from their "
      "condition; 1 = no guidance, above 1 = stronger guidance."
    )
  dropout = "text_dropout" if data.wants_text(config) else "class_dropout"
  if g != 1 and m[dropout] == 0:
    out.append(
      f"config.sample.guidance_scale={g} mixes in the unconditional model, but "
      f"config.model.{dropout}=0 never trains it; train with {dropout} > 0 (e.g. 0.1) or sample "
      "with guidance_scale=1."
    )
  name = f"config.model.name={m.name!r}"
  if data.wants_text(config):
    unused("model", ("num_classes", "class_dropout", "conditioning"), "dit", name)
    unused("sample", ("labels",), "a class-conditional model (dit)", f"{name} takes prompts")
  else:
    text_fields = (
      "text_dropout",
      "text_dropout_to",
      "qk_norm",
      "pos_embed_max_size",
      "pos_embed_base_size",
    )
    unused("model", text_fields + ("context_len", "context_dim", "pooled_dim"), "mmdit", name)
  sampler = f"config.diffusion.timestep_sampler={d.timestep_sampler!r}"
  if d.timestep_sampler != "mode":
    unused("diffusion", ("mode_scale",), "the 'mode' timestep sampler", sampler)
  if d.timestep_sampler != "logit_normal":
    unused("diffusion", ("logit_mean", "logit_std"), "the 'logit_normal' timestep sampler", sampler)
  if d.objective == "rectified_flow":
    unused(
      "diffusion",
      ("schedule", "num_timesteps"),
      "a VP objective (eps, v)",
      "config.diffusion.objective='rectified_flow'",
    )
  elif s.num_steps > d.num_timesteps:
    out.append(
      f"config.sample.num_steps={s.num_steps} exceeds config.diffusion.num_timesteps="
      f"{d.num_timesteps}; sampling takes {d.num_timesteps} steps."
    )
  # "auto" reads the gamma whenever the objective is eps, so a config that picks "auto" sets it
  # for that case whatever objective it trains now (the quickstart does).
  if d.loss_weighting == "none":
    unused(
      "diffusion",
      ("min_snr_gamma",),
      "loss_weighting 'min_snr' (or 'auto' with objective eps)",
      "config.diffusion.loss_weighting='none'",
    )
  if d.preconditioning == "none":
    unused(
      "diffusion",
      ("sigma_data",),
      "preconditioning 'edm'",
      "config.diffusion.preconditioning='none'",
    )
  solver = diffusion_lib.resolve_sampler(config)
  if solver != "ddim":
    picked = f" (which picks {solver!r})" if s.sampler == "auto" else ""
    unused("sample", ("eta",), "the ddim sampler", f"config.sample.sampler={s.sampler!r}{picked}")
  if g == 1:
    unused("sample", ("guided_channels",), "guidance", "config.sample.guidance_scale=1")
    for field, value in (("guidance_interval", s.guidance_interval), ("guide", s.guide.workdir)):
      if value:
        out.append(
          f"config.sample.{field} has no effect at config.sample.guidance_scale=1 (no guidance);"
          " set the scale (e.g. 1.5)."
        )
  if s.classifier.workdir and s.classifier.scale == 0:
    out.append(
      "config.sample.classifier.workdir is set but config.sample.classifier.scale=0 (off); set "
      "the scale (e.g. 1.0) to guide with the classifier."
    )
  if not config.train.eval_every:
    unused("train", ("eval_num_images",), "evaluation during training", "config.train.eval_every=0")
  if not config.eval.inception_weights:
    unused(
      "eval", ("reference", "batch_size"), "the FID Inception", "config.eval.inception_weights=''"
    )
  if s.clip_denoised and not data.is_pixel_data(config):
    out.append(
      "config.sample.clip_denoised=True clips these latents to [-1, 1], which suits pixels in "
      "[-1, 1] only; set it False."
    )
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the names and numbers in `config` that need no devices or data (and that the FID
  Inception's weights file of an evaluation during training is there), raising a ConfigError
  for the first that cannot work; then warns (on process 0, one line each) about the
  `unusual_settings`. The programs call it first; `experiment.build`, the loop and the samplers
  check their own fields again, for callers of the library."""
  experiment.check_config(config)
  loop.check_config(config)
  evaluation_checks.check_config(config)
  if jax.process_index() == 0:
    for message in unusual_settings(config):
      logging.warning(message)
