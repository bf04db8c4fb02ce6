"""Diffusion math as pure functions of arrays and a model closure; no Flax in this package.

`Diffusion` bundles the parts a config selects by name (schedule, objective, timestep sampler,
shift, loss weighting) and offers the two things training and evaluation need:
`training_loss(denoise, x0, rng)` and `sample(denoise, noise, ...)`, where
`denoise(z [B, H, W, C], model_time [B]) -> output [B, H, W, C or 2C]` wraps the network.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import config_defaults
from dit_jax.diffusion import objectives, samplers, timesteps, vlb
from dit_jax.diffusion.guidance import classifier_free_guidance
from dit_jax.diffusion.schedules import FlowSchedule, Schedule, VPSchedule, vp_schedule
from dit_jax.errors import ConfigError, check_choice

Denoise = Callable[[jax.Array, jax.Array], jax.Array]

__all__ = [
  "Diffusion",
  "FlowSchedule",
  "VPSchedule",
  "build_diffusion",
  "classifier_free_guidance",
  "objectives",
  "samplers",
  "timesteps",
  "vlb",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Diffusion:
  schedule: Schedule
  objective: str
  timestep_sampler: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  shift: float = 1.0
  learn_sigma: bool = False
  loss_weighting: str = "none"
  min_snr_gamma: float = 5.0
  preconditioning: str = "none"
  sigma_data: float = 0.5
  # The shift above is of the configured square size; `at_size` gives another size's
  # (SD3's resolution-dependent shift) when these are set.
  base_shift: float = 1.0
  shift_base_resolution: int = 0

  def at_size(self, height: int, width: int) -> "Diffusion":
    """This diffusion with the time shift of images of height x width (an aspect-ratio bucket):
    itself without a resolution-dependent shift (diffusion.shift_base_resolution = 0)."""
    if self.shift_base_resolution <= 0:
      return self
    shift = timesteps.resolution_shift(
      self.base_shift, height, self.shift_base_resolution, width=width
    )
    return self if shift == self.shift else dataclasses.replace(self, shift=shift)

  def sample_t(self, rng: jax.Array, batch: int) -> jax.Array:
    """Training times [B]: int32 in [0, T) for VP, float32 in [0, 1] for rectified flow."""
    u = timesteps.sample_unit_time(
      self.timestep_sampler,
      rng,
      (batch,),
      logit_mean=self.logit_mean,
      logit_std=self.logit_std,
      mode_scale=self.mode_scale,
    )
    return self.schedule.from_unit(timesteps.shift_time(u, self.shift))

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) shaped [B, 1, 1, 1] for broadcasting against images."""
    alpha, sigma = self.schedule.alpha_sigma(t)
    return alpha[:, None, None, None], sigma[:, None, None, None]

  def split_output(self, out: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Splits [B, H, W, 2C] into (mean prediction, variance output) when sigma is learned."""
    if not self.learn_sigma:
      return out, None
    c = out.shape[-1] // 2
    return out[..., :c], out[..., c:]

  def network_output(
    self, denoise: Denoise, z: jax.Array, t: jax.Array, alpha: jax.Array, sigma: jax.Array
  ) -> tuple[jax.Array, jax.Array | None]:
    """The objective's output at (z, t), and the variance output when sigma is learned.

    Without preconditioning this is the network's output itself; with "edm" the network sees
    z scaled to unit variance and its output is mapped by `objectives.edm_output`.
    """
    if self.preconditioning == "none":
      return self.split_output(denoise(z, self.schedule.model_time(t)))
    scale = objectives.edm_input_scale(alpha, sigma, self.sigma_data)
    f, var_out = self.split_output(denoise(z * scale, self.schedule.model_time(t)))
    out = objectives.edm_output(self.objective, f, z, alpha, sigma, self.sigma_data)
    return out, var_out

  def training_loss(
    self, denoise: Denoise, x0: jax.Array, rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss [B] and per-example terms (mse, vb, t), at times drawn by the timestep
    sampler and fresh noise."""
    rng_t, rng_eps = jax.random.split(rng)
    t = self.sample_t(rng_t, x0.shape[0])
    eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
    return self.loss_at(denoise, x0, t, eps)

  def loss_at(
    self, denoise: Denoise, x0: jax.Array, t: jax.Array, eps: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss [B] at given times t [B] (the schedule's: int for VP, float for flow)
    and noise eps [B, H, W, C], and its terms (mse, vb, t): `training_loss`'s and the
    validation loss's."""
    alpha, sigma = self.alpha_sigma(t)
    z = alpha * x0 + sigma * eps
    out, var_out = self.network_output(denoise, z, t, alpha, sigma)
    assert out.shape == x0.shape, (out.shape, x0.shape)
    goal = objectives.target(self.objective, x0, eps, alpha, sigma)
    weight = objectives.loss_weight(
      self.loss_weighting, self.objective, alpha, sigma, self.min_snr_gamma
    )[:, 0, 0, 0]
    mse = weight * jnp.mean((goal - out) ** 2, axis=(1, 2, 3))
    terms = {"mse": mse, "t": t.astype(jnp.float32)}
    loss = mse
    if var_out is not None:
      # The bound trains only the variance: the mean gets its gradient from the MSE alone.
      x0_hat, _ = objectives.to_x0_eps(self.objective, jax.lax.stop_gradient(out), z, alpha, sigma)
      terms["vb"] = vlb.vb_term(self.schedule, x0, z, t, x0_hat, var_out)
      loss = loss + terms["vb"]
    return loss, terms

  def classifier_loss(
    self,
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example cross-entropy [B] of a noise-aware classifier, and per-example terms
    (accuracy, t).

    The classifier sees z_t = alpha x0 + sigma eps at times t drawn by the timestep sampler,
    exactly as the diffusion model of the same config does (noise, schedule, shift), through
    `logits_fn(z [B, H, W, C], model_time [B]) -> logits [B, K]`; no input preconditioning, so
    that guidance differentiates it with respect to the sampler's own z.
    """
    rng_t, rng_eps = jax.random.split(rng)
    t = self.sample_t(rng_t, x0.shape[0])
    eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
    alpha, sigma = self.alpha_sigma(t)
    logits = logits_fn(alpha * x0 + sigma * eps, self.schedule.model_time(t))
    assert logits.ndim == 2 and logits.shape[0] == x0.shape[0], (logits.shape, x0.shape)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, K]
    ce = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return ce, {"accuracy": accuracy, "t": t.astype(jnp.float32)}

  def predictor(
    self,
    denoise: Denoise,
    clip_x0: bool = False,
    score_grad: samplers.Gradient | None = None,
  ) -> samplers.Predict:
    """Wraps `denoise` as predict(z, t) -> (x0_hat, eps_hat, var_out) for the samplers.

    `score_grad(z, model_time)` (classifier guidance on the score, ADM's `condition_score`):
    the score -eps / sigma gains the gradient, i.e. eps -= sigma * grad, and x0 follows from
    z = alpha x0 + sigma eps. Where alpha = 0 (rectified flow's t = 1) x0 is undefined, and the
    step is left unguided.
    """

    def predict(z, t):
      alpha, sigma = self.alpha_sigma(t)
      out, var_out = self.network_output(denoise, z, t, alpha, sigma)
      x0, eps = objectives.to_x0_eps(self.objective, out, z, alpha, sigma)
      if score_grad is not None:
        guided_eps = eps - sigma * score_grad(z, self.schedule.model_time(t))
        defined = alpha > 1e-6
        safe_alpha = jnp.where(defined, alpha, 1.0)
        x0 = jnp.where(defined, (z - sigma * guided_eps) / safe_alpha, x0)
        eps = jnp.where(defined, guided_eps, eps)
      if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = objectives.eps_from_x0(z, x0, alpha, sigma)
      return x0, eps, var_out

    return predict

  def sample(
    self,
    denoise: Denoise,
    noise: jax.Array,
    *,
    sampler: str,
    num_steps: int,
    rng: jax.Array,
    eta: float = 0.0,
    clip_x0: bool = False,
    classifier_grad: samplers.Gradient | None = None,
  ) -> jax.Array:
    """Runs the named sampler from `noise` [B, H, W, C]; jit the caller, not each step.

    `classifier_grad(z, model_time)`: scale x the gradient of log p(y | z_t) (classifier
    guidance): added to the mean, times the step's variance, by ddpm (ADM's `cond_fn`), and to
    the score by the others (ADM's `condition_score`, see `predictor`).
    """
    grid = samplers.time_grid(self.schedule, num_steps, self.shift)
    mean_grad = score_grad = None
    if classifier_grad is not None and sampler == "ddpm":
      model_time = self.schedule.model_time

      def mean_grad(z, t):
        return classifier_grad(z, model_time(t))
    else:
      score_grad = classifier_grad
    predict = self.predictor(denoise, clip_x0, score_grad)
    return samplers.run_sampler(
      sampler, self.schedule, predict, noise, grid, rng, eta, mean_grad=mean_grad
    )

  def evaluation_times(self, sampler: str, num_steps: int) -> np.ndarray:
    """The model times at which `sampler` calls the network in `num_steps` steps, in order
    (Heun's second call of each step but the last is at the next grid point)."""
    grid = samplers.time_grid(self.schedule, num_steps, self.shift)
    times = np.asarray(self.schedule.model_time(jnp.asarray(grid)), np.float64)
    if sampler != "heun":
      return times
    return np.concatenate([np.stack([times[:-1], times[1:]], 1).reshape(-1), times[-1:]])


def default_sampler(objective: str) -> str:
  return "euler" if objective == "rectified_flow" else "ddim"


def resolve_sampler(config: ml_collections.ConfigDict) -> str:
  """The sampler `config.sample.sampler` names ("auto" picks one that suits the objective)."""
  name = config.sample.sampler
  if name == "auto":
    return default_sampler(config.diffusion.objective)
  check_choice(name, config_defaults.SAMPLERS, "sample.sampler")
  if name in ("ddpm", "ddim") and config.diffusion.objective == "rectified_flow":
    raise ConfigError(
      f"config.sample.sampler={name!r} needs a VP objective (eps or v); for rectified flow use "
      "euler or heun."
    )
  return name


def resolve_loss_weighting(name: str, objective: str) -> str:
  """The weighting `diffusion.loss_weighting` names; "auto" is min-SNR for eps and the plain MSE
  for v and rectified flow, whose own weighting already stresses the noisier half."""
  if name == "auto":
    return "min_snr" if objective == "eps" else "none"
  return name


def _require(
  d: ml_collections.ConfigDict, field: str, ok: Callable[[float], bool], accepted: str
) -> None:
  value = d[field]
  if not (math.isfinite(value) and ok(value)):
    raise ConfigError(f"config.diffusion.{field}={value} must be {accepted}.")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError naming the field, the value and the accepted ones for a name or number
  in `config.diffusion` that cannot work (NaN and infinity included), whether or not the chosen
  parts use it."""
  d = config.diffusion
  check_choice(d.objective, config_defaults.OBJECTIVES, "diffusion.objective")
  check_choice(d.schedule, config_defaults.VP_SCHEDULES, "diffusion.schedule")
  check_choice(d.timestep_sampler, config_defaults.TIMESTEP_SAMPLERS, "diffusion.timestep_sampler")
  check_choice(d.loss_weighting, config_defaults.LOSS_WEIGHTINGS, "diffusion.loss_weighting")
  check_choice(d.preconditioning, config_defaults.PRECONDITIONINGS, "diffusion.preconditioning")
  _require(d, "num_timesteps", lambda v: v >= 2, ">= 2")
  _require(d, "logit_mean", lambda v: True, "a finite number")
  _require(d, "logit_std", lambda v: v > 0, "> 0 (the spread of the logit-normal timesteps)")
  lo, hi = timesteps.MODE_SCALE_RANGE
  _require(
    d,
    "mode_scale",
    lambda v: lo <= v <= hi,
    f"in [{lo:g}, 2/(pi-2) = {hi:.4f}], where the mode sampler maps [0, 1] onto [0, 1] "
    "monotonically",
  )
  _require(d, "shift", lambda v: v > 0, "> 0 (1.0 = no shift)")
  _require(d, "shift_base_resolution", lambda v: v >= 0, ">= 0 (0 = no resolution shift)")
  _require(d, "min_snr_gamma", lambda v: v > 0, "> 0 (the SNR at which min-SNR caps the weight)")
  _require(
    d,
    "sigma_data",
    lambda v: v > 0,
    "> 0 (the data's standard deviation; 0.5 suits images in [-1, 1])",
  )


def build_diffusion(config: ml_collections.ConfigDict) -> Diffusion:
  """The diffusion process `config.diffusion` describes, for images of `config.data`."""
  check_config(config)
  d = config.diffusion
  if d.objective == "rectified_flow":
    schedule = FlowSchedule()
  else:
    schedule = vp_schedule(d.schedule, d.num_timesteps)
  return Diffusion(
    schedule=schedule,
    objective=d.objective,
    timestep_sampler=d.timestep_sampler,
    logit_mean=d.logit_mean,
    logit_std=d.logit_std,
    mode_scale=d.mode_scale,
    shift=timesteps.resolution_shift(d.shift, config.data.image_size, d.shift_base_resolution),
    learn_sigma=config.model.learn_sigma,
    loss_weighting=resolve_loss_weighting(d.loss_weighting, d.objective),
    min_snr_gamma=d.min_snr_gamma,
    preconditioning=d.preconditioning,
    sigma_data=d.sigma_data,
    base_shift=d.shift,
    shift_base_resolution=d.shift_base_resolution,
  )
