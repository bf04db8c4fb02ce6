"""Training-time samplers of t in [0, 1] (SD3 paper, Esser et al. 2024, §3.1) and the time shift.

Each sampler draws u ~ U(0, 1) (or a normal) and maps it to t; t = 1 is pure noise. The densities
below are what `tests/test_timesteps.py` checks the histograms against.
- uniform:       pi(t) = 1.
- logit_normal:  t = sigmoid(m + s * n), n ~ N(0, 1).
- mode:          t = 1 - u - s * (cos^2(pi/2 * u) - 1 + u), heavy tails, mode controlled by s.
- cosmap:        t = 1 - 1 / (tan(pi/2 * u) + 1), density 2 / (pi - 2 pi t + 2 pi t^2).
"""

import math

import jax
import jax.numpy as jnp

SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")

# The mode map f(u) = 1 - u - s (cos^2(pi/2 u) - 1 + u) has f(0) = 1, f(1) = 0 and
# f'(u) = -1 - s + s pi/2 sin(pi u); it is a decreasing map of [0, 1] onto itself (a density)
# iff f' <= 0 on [0, 1]: at sin(pi u) = 0 for s < 0 (s >= -1) and at sin(pi u) = 1 for s > 0
# (s <= 2 / (pi - 2) ~ 1.752).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def mode_transform(u: jax.Array, scale: float) -> jax.Array:
  return 1.0 - u - scale * (jnp.cos(math.pi / 2 * u) ** 2 - 1.0 + u)


def cosmap_transform(u: jax.Array) -> jax.Array:
  return 1.0 - 1.0 / (jnp.tan(math.pi / 2 * u) + 1.0)


def sample_unit_time(
  name: str,
  rng: jax.Array,
  shape: tuple[int, ...],
  *,
  logit_mean: float = 0.0,
  logit_std: float = 1.0,
  mode_scale: float = 1.29,
) -> jax.Array:
  """Draws t in [0, 1] from the named density."""
  if name == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape))
  u = jax.random.uniform(rng, shape)
  if name == "uniform":
    return u
  if name == "mode":
    return jnp.clip(mode_transform(u, mode_scale), 0.0, 1.0)
  if name == "cosmap":
    return jnp.clip(cosmap_transform(u), 0.0, 1.0)
  raise ValueError(f"Unknown timestep sampler {name!r}; choose one of {SAMPLERS}.")


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """SD3's time shift, t -> s t / (1 + (s - 1) t): s > 1 spends more time at high noise."""
  if shift == 1.0:
    return t
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
  base_shift: float, image_size: int, base_resolution: int, width: int | None = None
) -> float:
  """The resolution-dependent shift: alpha = sqrt(m / n) for m = H * W (H = image_size, W =
  width, default H) and n = base^2 pixels."""
  if base_resolution <= 0:
    return base_shift
  if width is None or width == image_size:
    return base_shift * image_size / base_resolution
  return base_shift * math.sqrt(image_size * width) / base_resolution
