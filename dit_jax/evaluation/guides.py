"""The second networks guided sampling consults, restored onto the main model's mesh:
autoguidance's guide (a weaker run of the same model) and classifier guidance's noise-aware
classifier, each checked against the model it guides; and what guidance steers (the guided
channels, the passes a guidance interval saves)."""

import dataclasses

import jax
import ml_collections
import numpy as np
from absl import logging

from dit_jax import checkpoint, config_defaults, experiment
from dit_jax import diffusion as diffusion_lib
from dit_jax.errors import ConfigError
from dit_jax.models.classifier import log_prob_grad


def guided_channels(config: ml_collections.ConfigDict) -> int:
  """The output channels that guidance steers: config.sample.guided_channels, 0 meaning all."""
  n, c = config.sample.guided_channels, config.data.channels
  if not 0 <= n <= c:
    raise ConfigError(
      f"config.sample.guided_channels={n} must be between 0 (all channels) and "
      f"config.data.channels={c}; the official DiT guides 3 of its 4 latent channels."
    )
  return n or c


@dataclasses.dataclass(frozen=True)
class Auxiliary:
  """A second network a sampler consults (autoguidance's guide, classifier guidance's
  classifier), built from its own config and restored onto the main model's mesh."""

  exp: experiment.Experiment
  params: object
  step: int
  workdir: str


def _restore_auxiliary(
  config: ml_collections.ConfigDict, workdir: str, step: int, mesh, field: str
) -> Auxiliary:
  exp = experiment.build(config, devices=list(mesh.devices.flat), training=False)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, config=config)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ConfigError(
        f"config.sample.{field}.workdir={workdir!r} holds no checkpoint (looked in "
        f"{ckpt.directory}); point it at a training run."
      )
    step = step or steps[-1]
    if step not in steps:
      raise ConfigError(
        f"config.sample.{field}.step={step} is not a checkpoint of {ckpt.directory}; it holds "
        f"steps {steps}."
      )
    params = ckpt.restore_params(
      step,
      exp.abstract_state.params,
      ema=config.sample.use_ema,
      ema_index=config.sample.ema_index,
    )
  finally:
    ckpt.close()
  logging.info("config.sample.%s: restored step %d of %s.", field, step, workdir)
  return Auxiliary(exp, params, step, workdir)


def _saved_config(workdir: str, step: int, field: str) -> ml_collections.ConfigDict:
  """The config saved with checkpoint `step` (0: the newest) of `workdir`."""
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    saved = ckpt.saved_config(step or steps[-1]) if steps else None
  finally:
    ckpt.close()
  if saved is None:
    raise ConfigError(
      f"config.sample.{field}.workdir={workdir!r} holds no readable checkpoint with its config "
      f"(looked in {ckpt.directory}); point it at a training run of dit_jax."
    )
  return config_defaults.from_saved(saved)


def _check_same_images(config, other, field: str, workdir: str) -> None:
  ours = (config.data.image_size, config.data.channels)
  theirs = (other.data.image_size, other.data.channels)
  if ours != theirs:
    raise ConfigError(
      f"config.sample.{field}.workdir={workdir!r} was trained on {theirs[0]}x{theirs[0]}x"
      f"{theirs[1]} inputs, but this model makes {ours[0]}x{ours[0]}x{ours[1]}; use a "
      f"{field} trained on the same data."
    )


def load_guide(config: ml_collections.ConfigDict, mesh) -> Auxiliary | None:
  """Autoguidance's guide (config.sample.guide), or None: the main model's config with the
  guide's variant, restored from guide.workdir at guide.step."""
  g = config.sample.guide
  if not g.workdir or config.sample.guidance_scale == 1.0:
    return None
  saved = _saved_config(g.workdir, g.step, "guide")
  _check_same_images(config, saved, "guide", g.workdir)
  guide = ml_collections.ConfigDict(config.to_dict())
  guide.model.variant = g.variant or saved.model.get("variant", config.model.variant)
  for key in ("width", "depth", "heads"):
    guide.model[key] = saved.model.get(key, guide.model[key])
  return _restore_auxiliary(guide, g.workdir, g.step, mesh, "guide")


def load_classifier(config: ml_collections.ConfigDict, mesh) -> Auxiliary | None:
  """Classifier guidance's noise-aware classifier (config.sample.classifier), or None: built
  from the config saved in its workdir, on this run's mesh."""
  k = config.sample.classifier
  if not k.workdir or k.scale == 0:
    return None
  saved = _saved_config(k.workdir, k.step, "classifier")
  where = f"config.sample.classifier.workdir={k.workdir!r}"
  if saved.model.name != "classifier":
    raise ConfigError(
      f"{where} holds a {saved.model.name!r} model, not a noise-aware classifier; train one with "
      "model.name='classifier' (e.g. configs/quickstart_classifier.py)."
    )
  if saved.model.num_classes != config.model.num_classes:
    raise ConfigError(
      f"{where} classifies {saved.model.num_classes} classes, but this model has "
      f"config.model.num_classes={config.model.num_classes}; use a classifier of the same labels."
    )
  _check_same_images(config, saved, "classifier", k.workdir)
  fields = ("objective", "schedule", "num_timesteps")
  if any(saved.diffusion[f] != config.diffusion[f] for f in fields):
    theirs = {f: saved.diffusion[f] for f in fields}
    ours = {f: config.diffusion[f] for f in fields}
    raise ConfigError(
      f"{where} was trained on the noise process {theirs}, but this model's is {ours}: its "
      "gradients would be read at the wrong noise levels; train the classifier with this "
      "model's diffusion settings."
    )
  # The classifier as it was trained (model, noise, data), laid out on this run's mesh.
  cls = config_defaults.base_config()
  for section in ("model", "diffusion", "data"):
    cls[section].update(saved[section].to_dict())
  cls.parallel = ml_collections.ConfigDict(config.parallel.to_dict())
  cls.sample.use_ema = config.sample.use_ema
  return _restore_auxiliary(cls, k.workdir, k.step, mesh, "classifier")


def interval_passes(config: ml_collections.ConfigDict, diffusion) -> dict[str, int] | None:
  """Network passes per image with config.sample.guidance_interval: the evaluations of the
  sampler, how many of them fall in the interval (and are guided: 2 passes) and how many
  unconditional passes that saves over guiding at every evaluation. None without an interval
  or guidance."""
  s = config.sample
  if not s.guidance_interval or s.guidance_scale == 1.0:
    return None
  lo, hi = s.guidance_interval
  sampler = diffusion_lib.resolve_sampler(config)
  times = diffusion.evaluation_times(sampler, s.num_steps)
  levels = np.asarray(diffusion.schedule.noise_level(times), np.float64)
  guided = int(np.sum((levels > lo) & (levels <= hi)))
  n = len(times)
  return {"evaluations": n, "guided": guided, "passes": n + guided, "saved": n - guided}


def classifier_gradient(model, params, labels: jax.Array, scale: float):
  """grad(z [B, H, W, C], model_time [B]) -> scale x d log p(labels | z, t) / dz [B, H, W, C]
  of a noise-aware classifier (`dit_jax.models.classifier`): each row the gradient of its own
  log-probability (the rows do not interact, so the gradient of their sum), in float32."""

  def logits(z, model_time):
    return model.apply({"params": params}, z, model_time)

  return lambda z, model_time: scale * log_prob_grad(logits, z, model_time, labels)
