"""Samplers: DDPM ancestral, DDIM, and Euler / Heun ODE solvers, each one `lax.scan`.

A sampler takes `predict(z, t_index) -> (x0_hat, eps_hat, var_out)` evaluated on a descending time
grid, so it works for any objective. Euler and Heun integrate
- rectified flow: dz/dt = eps - x0 in t (the diffusers / SD3 Euler step);
- VP: the probability-flow ODE written in y = z / alpha and s = sigma / alpha, where it reads
  dy/ds = eps (Karras et al. 2022); its Euler step equals DDIM with eta = 0.
The last step of Heun is an Euler step, as the second evaluation would be at t = 0.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import timesteps
from dit_jax.diffusion.schedules import FlowSchedule, Schedule, VPSchedule
from dit_jax.diffusion.vlb import learned_log_variance, posterior

SAMPLERS = ("ddpm", "ddim", "euler", "heun")
Predict = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array | None]]


FLOW_TRAIN_STEPS = 1000  # Flow time t is fed to the model as 1000 t (SD3's "timestep").


def time_grid(schedule: Schedule, num_steps: int, shift: float = 1.0) -> np.ndarray:
  """Descending grid of `num_steps` times at which the model is evaluated.

  VP: `respaced_timesteps`, the integers of the released DiT's respacing (the samplers run the
  respaced process, whose alpha_bar are those of the grid points). Flow: the grid of diffusers'
  FlowMatchEulerDiscreteScheduler (SD3): evenly spaced from 1 down to the smallest training time
  shift(1 / 1000), then time-shifted; the solver's final target is t = 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if isinstance(schedule, VPSchedule):
    return respaced_timesteps(schedule.num_timesteps, num_steps)
  t_min = float(timesteps.shift_time(np.float64(1.0 / FLOW_TRAIN_STEPS), shift))
  unit = np.linspace(1.0, t_min, num_steps)
  return np.asarray(timesteps.shift_time(unit, shift), np.float32)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` of the integers 0 .. T - 1, descending, as the DiT / ADM code respaces a T-step
  process for `num_steps` sampling steps (`space_timesteps(T, str(num_steps))`).

  Step i takes round(i * stride) with stride (T - 1) / (num_steps - 1) summed up in float64 and
  rounded half to even, as that code does; the sums differ from i * stride in the last bits, so
  a few step counts (e.g. 21) pick a neighbour of the evenly spaced grid. One step is t = 0.
  More steps than T are clamped to T.
  """
  steps = min(num_steps, num_timesteps)
  stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1.0
  picked, position = [], 0.0
  for _ in range(steps):
    picked.append(round(position))  # Python's round: half to even, like the reference.
    position += stride
  return np.array(sorted(set(picked), reverse=True), np.int32)


def _scan(step_fn, z, xs):
  """Runs `z = step_fn(z, x)` over the rows of the numpy arrays `xs` (float64 -> float32)."""
  xs = tuple(jnp.asarray(a, jnp.float32 if a.dtype == np.float64 else None) for a in xs)
  z, _ = jax.lax.scan(lambda carry, x: (step_fn(carry, x), None), z, xs)
  return z


def ode_sample(
  schedule: Schedule, predict: Predict, noise: jax.Array, grid: np.ndarray, *, heun: bool
) -> jax.Array:
  """Euler (heun=False) or Heun integration from pure noise along `grid` to clean data."""
  b = noise.shape[0]
  if isinstance(schedule, FlowSchedule):
    scale = np.ones(len(grid) + 1, np.float32)
    s = np.append(grid, 0.0).astype(np.float32)

    def velocity(x0, eps):
      return eps - x0
  else:
    acp = schedule.alphas_cumprod[grid]
    scale = np.append(np.sqrt(acp), 1.0).astype(np.float32)  # z = scale * y
    s = np.append(np.sqrt((1.0 - acp) / acp), 0.0).astype(np.float32)

    def velocity(x0, eps):
      del x0
      return eps

  t_next = np.append(grid[1:], grid[-1])  # The last entry is unused (Euler final step).

  def f(y, t, c):
    x0, eps, _ = predict(y * c, jnp.full((b,), t))
    return velocity(x0, eps)

  def step(y, xs):
    t, tn, c, cn, s_i, s_n, last = xs
    d = f(y, t, c)
    y_euler = y + (s_n - s_i) * d
    if not heun:
      return y_euler

    def correct(_):
      return y + (s_n - s_i) * 0.5 * (d + f(y_euler, tn, cn))

    return jax.lax.cond(last, lambda _: y_euler, correct, None)

  last = np.arange(len(grid)) == len(grid) - 1
  xs = (grid, t_next, scale[:-1], scale[1:], s[:-1], s[1:], last)
  y = _scan(step, noise / scale[0], xs)
  return y  # scale[-1] == 1: y is the clean sample.


def ddim_sample(
  schedule: VPSchedule, predict: Predict, noise: jax.Array, grid: np.ndarray, rng, eta: float
) -> jax.Array:
  """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
  acp = schedule.alphas_cumprod[grid]
  acp_prev = np.append(schedule.alphas_cumprod[grid[1:]], 1.0)
  sigma = eta * np.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
  dir_coef = np.sqrt(np.maximum(1 - acp_prev - sigma**2, 0.0))
  b = noise.shape[0]

  def step(z, xs):
    i, t, a_prev, sig, d = xs
    x0, eps, _ = predict(z, jnp.full((b,), t))
    noise_i = jax.random.normal(jax.random.fold_in(rng, i), z.shape)
    return jnp.sqrt(a_prev) * x0 + d * eps + sig * noise_i

  xs = (np.arange(len(grid)), grid, acp_prev, sigma, dir_coef)
  return _scan(step, noise, xs)


# grad(z [B, ...], t [B]) -> the gradient of log p(y | z, t) [B, ...] (classifier guidance),
# already multiplied by its scale.
Gradient = Callable[[jax.Array, jax.Array], jax.Array]


def ddpm_sample(
  schedule: VPSchedule,
  predict: Predict,
  noise: jax.Array,
  grid: np.ndarray,
  rng,
  mean_grad: Gradient | None = None,
) -> jax.Array:
  """Ancestral sampling with the posterior q(x_prev | x_t, x0_hat); respaced when the grid is
  shorter than T. Uses the learned variance when the network outputs one, else beta_tilde.

  `mean_grad` (classifier guidance as ADM applies it to DDPM): the step's mean moves by its
  variance times mean_grad(z, t)."""
  coef_x0, coef_xt, _, log_var, log_beta = posterior(schedule.alphas_cumprod, grid)
  b = noise.shape[0]

  def step(z, xs):
    i, t, c0, ct, lv, lb = xs
    x0, _, var_out = predict(z, jnp.full((b,), t))
    mean = c0 * x0 + ct * z
    log_variance = lv if var_out is None else learned_log_variance(var_out, lv, lb)
    if mean_grad is not None:
      mean = mean + jnp.exp(log_variance) * mean_grad(z, jnp.full((b,), t))
    noise_i = jax.random.normal(jax.random.fold_in(rng, i), z.shape)
    not_last = (i < len(grid) - 1).astype(z.dtype)
    return mean + not_last * jnp.exp(0.5 * log_variance) * noise_i

  xs = (np.arange(len(grid)), grid, coef_x0, coef_xt, log_var, log_beta)
  return _scan(step, noise, xs)


def run_sampler(
  name: str,
  schedule: Schedule,
  predict: Predict,
  noise: jax.Array,
  grid: np.ndarray,
  rng: jax.Array,
  eta: float = 0.0,
  mean_grad: Gradient | None = None,
) -> jax.Array:
  """Runs sampler `name`. `mean_grad` is for ddpm only (the others take classifier guidance
  through `predict`)."""
  if mean_grad is not None and name != "ddpm":
    raise ValueError(f"mean_grad is ddpm's; {name!r} takes classifier guidance in `predict`.")
  if name in ("euler", "heun"):
    return ode_sample(schedule, predict, noise, grid, heun=name == "heun")
  if not isinstance(schedule, VPSchedule):
    raise ValueError(f"sampler {name!r} needs a VP objective (eps or v); use euler or heun.")
  if name == "ddim":
    return ddim_sample(schedule, predict, noise, grid, rng, eta)
  if name == "ddpm":
    return ddpm_sample(schedule, predict, noise, grid, rng, mean_grad)
  raise ValueError(f"Unknown sampler {name!r}; choose one of {SAMPLERS}.")
