"""Noise schedules: how clean data x0 and noise eps mix into z_t = alpha_t * x0 + sigma_t * eps.

Two families, each a small frozen dataclass with the same methods:
- `VPSchedule`: the discrete variance-preserving process of DDPM (T steps, integer t, t = T-1 is
  almost pure noise), with the linear or cosine beta schedule.
- `FlowSchedule`: rectified flow, continuous t in [0, 1], alpha = 1 - t, sigma = t (SD3 notation:
  t = 1 is pure noise).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int) -> np.ndarray:
  """The DDPM linear schedule, rescaled so that any T spans the same range as T = 1000."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """The cosine schedule of improved DDPM: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""

  def alpha_bar(u: np.ndarray) -> np.ndarray:
    return np.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

  u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  bars = alpha_bar(u)
  return np.minimum(1.0 - bars[1:] / bars[:-1], max_beta)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


@dataclasses.dataclass(frozen=True, eq=False)
class VPSchedule:
  """Discrete variance-preserving schedule; t is an integer in [0, T)."""

  betas: np.ndarray  # [T], float64

  kind = "vp"

  @property
  def num_timesteps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (alpha_t, sigma_t), each shaped like t."""
    acp = jnp.asarray(self.alphas_cumprod, jnp.float32)[t]
    return jnp.sqrt(acp), jnp.sqrt(1.0 - acp)

  def from_unit(self, u: jax.Array) -> jax.Array:
    """Maps u in [0, 1] (from a timestep sampler) onto the integer range [0, T)."""
    t = jnp.floor(u * self.num_timesteps).astype(jnp.int32)
    return jnp.clip(t, 0, self.num_timesteps - 1)

  def model_time(self, t: jax.Array) -> jax.Array:
    """What the network's timestep embedder sees."""
    return t.astype(jnp.float32)

  def unit_time(self, model_time):
    """Model time -> u in [0, 1) (t / T; u -> 1 is pure noise), the inverse of `from_unit`."""
    return model_time / self.num_timesteps

  def noise_level(self, model_time):
    """Model time -> EDM's sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise-to-signal ratio
    of z_t (what the guidance interval is given in). numpy in, numpy out; jax likewise."""
    if isinstance(model_time, np.ndarray | float | int):
      acp = self.alphas_cumprod[np.asarray(model_time).astype(np.int64)]
      return np.sqrt((1.0 - acp) / acp)
    acp = jnp.asarray(self.alphas_cumprod, jnp.float32)[model_time.astype(jnp.int32)]
    return jnp.sqrt((1.0 - acp) / acp)


@dataclasses.dataclass(frozen=True, eq=False)
class FlowSchedule:
  """Rectified flow: z_t = (1 - t) x0 + t eps, t in [0, 1]."""

  kind = "flow"

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = t.astype(jnp.float32)
    return 1.0 - t, t

  def from_unit(self, u: jax.Array) -> jax.Array:
    return u.astype(jnp.float32)

  def model_time(self, t: jax.Array) -> jax.Array:
    # Scaled to the range of the VP timesteps, as SD3 does, so one embedder suits both.
    return 1000.0 * t.astype(jnp.float32)

  def unit_time(self, model_time):
    """Model time -> t in [0, 1] (1 = pure noise)."""
    return model_time / 1000.0

  def noise_level(self, model_time):
    """Model time -> t itself: rectified flow's guidance interval is given in t."""
    return model_time / 1000.0


Schedule = VPSchedule | FlowSchedule


def vp_schedule(name: str, num_timesteps: int = 1000) -> VPSchedule:
  return VPSchedule(BETA_SCHEDULES[name](num_timesteps))
