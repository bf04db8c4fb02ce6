"""Builds every part a config selects, validated up front; shared by training, sampling,
evaluation and benchmarks so that they all run exactly the same model and step."""

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from dit_jax import config_defaults, data, models, parallel, storage
from dit_jax import diffusion as diffusion_lib
from dit_jax.conditioning import Conditioner, LabelConditioner, build_conditioner
from dit_jax.data import text
from dit_jax.errors import ConfigError, check_choice
from dit_jax.models import attention
from dit_jax.train import ema as ema_lib
from dit_jax.train import step as step_lib
from dit_jax.train.state import TrainState, learning_rate, optimizer


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  model: nn.Module
  conditioner: Conditioner
  diffusion: diffusion_lib.Diffusion
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  mesh: Mesh
  rules: tuple
  abstract_state: TrainState  # Shapes, unboxed, each leaf carrying its sharding.
  state_shardings: TrainState
  # The jitted train step, made on first use: one jit per experiment, so a second call of
  # jit_train_step() is served by its trace and compile caches.
  _train_step: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  @property
  def param_shardings(self) -> Any:
    return self.state_shardings.params

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical-axis rules that tracing the model needs; wrap calls of jitted steps.

    The mesh must be set with `jax.set_mesh`: Flax applies the models' activation constraints
    only under an (abstract) mesh, and silently skips them otherwise.
    """
    with mesh_context(self.mesh, self.rules):
      yield

  def init_state(self) -> TrainState:
    """Builds the train state directly in its shardings (no host-side copy)."""
    init = step_lib.unboxed(
      step_lib.make_init_fn(
        self.model,
        self.conditioner,
        self.tx,
        self.config.train.seed,
        len(ema_lib.gammas(self.config)),
      )
    )
    with self.context():
      return jax.jit(init, out_shardings=self.state_shardings)()

  def jit_train_step(self):
    """The train step, jitted with explicit shardings (once per experiment); the input state is
    donated. Call it within `self.context()`."""
    if self._train_step is not None:
      return self._train_step
    fn = functools.partial(
      step_lib.train_step,
      model=self.model,
      conditioner=self.conditioner,
      diffusion=self.diffusion,
      tx=self.tx,
      lr_fn=self.lr_fn,
      ema_decay=self.config.train.ema_decay,
      ema_gammas=ema_lib.gammas(self.config),
    )
    self._train_step = jax.jit(
      fn,
      in_shardings=(self.state_shardings, parallel.batch_sharding(self.mesh)),
      out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
      donate_argnums=(0,),
    )
    return self._train_step

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global training batch, sharded over the data axes."""
    b = self.config.train.batch_size if batch_size is None else batch_size
    d = self.config.data
    sharding = parallel.batch_sharding(self.mesh)
    cond = {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
      for k, s in self.conditioner.shapes(b).items()
    }
    image = jax.ShapeDtypeStruct(
      (b, d.image_size, d.image_size, d.channels), jnp.float32, sharding=sharding
    )
    return {"image": image, **cond}


# What each number in config.model, .train, .sample and .eval accepts, as (field, a key of
# _ACCEPTS, what the value means). config.diffusion's are checked by diffusion.check_config;
# sample.guided_channels, whose bound depends on the data, by sampling.
_ACCEPTS = {
  "> 0": lambda v: v > 0,
  ">= 0": lambda v: v >= 0,
  "in [0, 1)": lambda v: 0 <= v < 1,
  "in [0, 1]": lambda v: 0 <= v <= 1,
  "in [0, 2**32)": lambda v: 0 <= v < 2**32,  # JAX keys take 32 bits; numpy's seeds are >= 0.
  "a finite number": lambda v: True,
}
_NUMBERS = (
  ("model.num_classes", "> 0", ""),
  ("model.class_dropout", "in [0, 1)", " (the probability of training without the label)"),
  ("model.text_dropout", "in [0, 1)", " (the probability of dropping each text encoder)"),
  ("model.width", ">= 0", " (0 = the variant's)"),
  ("model.depth", ">= 0", " (0 = the variant's)"),
  ("model.heads", ">= 0", " (0 = the variant's)"),
  ("model.mlp_ratio", "> 0", ""),
  ("model.scan_unroll", "> 0", " (blocks per scan iteration)"),
  ("model.pos_embed_max_size", ">= 0", " (0 = the image's grid)"),
  ("model.pos_embed_base_size", ">= 0", " (0 = pos_embed_max_size)"),
  ("model.context_len", ">= 0", " (0 = the data's)"),
  ("model.context_dim", ">= 0", " (0 = the data's)"),
  ("model.pooled_dim", ">= 0", " (0 = the data's)"),
  ("data.image_size", "> 0", ""),
  ("data.channels", "> 0", ""),
  ("data.latent_scale", "> 0", " (the factor pre-encoded latents are multiplied by)"),
  ("data.num_workers", ">= 0", " (0 = threads in this process)"),
  ("data.prefetch", ">= 0", " (0 = off)"),
  ("train.batch_size", "> 0", ""),
  ("train.num_steps", "> 0", ""),
  ("train.seed", "in [0, 2**32)", ""),
  ("train.lr", "> 0", ""),
  ("train.warmup_steps", ">= 0", ""),
  ("train.weight_decay", ">= 0", ""),
  ("train.b1", "in [0, 1)", " (Adam's decay rate of the gradient's mean)"),
  ("train.b2", "in [0, 1)", " (Adam's decay rate of the squared gradient's mean)"),
  ("train.grad_clip", ">= 0", " (0 = no clipping)"),
  ("train.ema_decay", "in [0, 1)", ""),
  ("train.log_every", "> 0", ""),
  ("train.checkpoint_every", "> 0", ""),
  ("train.keep_checkpoints", "> 0", ""),
  ("train.keep_every", ">= 0", " (0 = off)"),
  ("train.sample_every", ">= 0", " (0 = only at the end)"),
  ("train.eval_every", ">= 0", " (0 = off)"),
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


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  for field, accepted, meaning in _NUMBERS:
    section, name = field.split(".")
    value = config[section][name]
    if not (math.isfinite(value) and _ACCEPTS[accepted](value)):
      raise ConfigError(f"config.{field}={value} must be {accepted}{meaning}.")


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
    text_fields = ("text_dropout", "qk_norm", "pos_embed_max_size", "pos_embed_base_size")
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
  Inception's weights file of an evaluation during training is there), raising a
  ConfigError for one that cannot work; then warns (on process 0, one line each) about the
  `unusual_settings`. Training, sampling and evaluation all call it (through `build`)."""
  # The model's name first: the data's checks read it (e.g. whether the data needs text).
  check_choice(config.model.name, models.MODELS, "model.name")
  check_choice(config.train.nonfinite, ("stop", "skip"), "train.nonfinite")
  check_choice(config.sample.labels, ("balanced", "random"), "sample.labels")
  _check_numbers(config)
  _check_output_names(config)
  diffusion_lib.check_config(config)
  _check_prompts(config)
  _check_training_eval(config)
  ema_lib.check_config(config)
  _check_guidance(config)
  diffusion_lib.resolve_sampler(config)
  if jax.process_index() == 0:
    for message in unusual_settings(config):
      logging.warning(message)


def build(config: ml_collections.ConfigDict, devices=None, *, training: bool = True) -> Experiment:
  """Validates `config` and builds the model, diffusion, optimizer, mesh and state layout.

  `training=False` (sampling, evaluation, imports) skips the check that train.batch_size divides
  over the devices, so that a checkpoint restores onto any number of them.
  """
  validate(config)
  text_spec = data.text_spec(config)
  if config.model.name == "classifier":
    # The labels are the classifier's targets: never dropped to the null class.
    conditioner = LabelConditioner(config.model.num_classes, 0.0)
  else:
    conditioner = build_conditioner(config, text_spec)
  model = models.build_model(config, text_spec)
  diff = diffusion_lib.build_diffusion(config)
  tx = optimizer(config)
  mesh = parallel.make_mesh(config, devices)
  attention.check_platform(config.model.attention, mesh.devices.flat[0].platform)
  if training:
    parallel.check_batch_size(config.train.batch_size, mesh)
  rules = parallel.axis_rules(config)
  num_ema = len(ema_lib.gammas(config))
  init = step_lib.make_init_fn(model, conditioner, tx, config.train.seed, num_ema)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  return Experiment(
    config, model, conditioner, diff, tx, learning_rate(config), mesh, rules, abstract, shardings
  )
