"""The variational bound term that trains a learned variance (improved DDPM, Nichol & Dhariwal).

The network outputs, per pixel, v in [-1, 1] (roughly) that interpolates the log variance of
p(x_{t-1} | x_t) between the two natural choices, log beta_t and log beta_tilde_t.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.schedules import VPSchedule


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(x, mean, log_scale, bins: int = 256):
  """log P(x) for data in [-1, 1] quantized to `bins` levels under N(mean, e^(2 log_scale))."""
  half_bin = 1.0 / (bins - 1)
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + half_bin)
  lower = inv_std * (x - mean - half_bin)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  # log(Phi(upper) - Phi(lower)), computed where it is numerically safe.
  mid = jnp.log(jnp.maximum(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower), 1e-12))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, mid))


def posterior(schedule_alphas_cumprod: np.ndarray, t_grid: np.ndarray):
  """Coefficients of q(x_prev | x_t, x0) along a grid of timesteps (descending, any spacing).

  Returns numpy arrays over the grid: (coef_x0, coef_xt, variance, log_variance_clipped, log_beta)
  where beta is the effective beta of the (possibly respaced) step t_grid[i] -> t_grid[i + 1]
  (the last step goes to alpha_bar = 1).
  """
  acp = schedule_alphas_cumprod[t_grid]
  acp_prev = np.append(schedule_alphas_cumprod[t_grid[1:]], 1.0)
  beta = 1.0 - acp / acp_prev
  var = beta * (1.0 - acp_prev) / (1.0 - acp)
  # The last step has zero posterior variance; use its neighbour's so the log stays finite.
  var_clipped = var.copy()
  if len(var) > 1:
    var_clipped[-1] = var[-2]
  coef_x0 = beta * np.sqrt(acp_prev) / (1.0 - acp)
  coef_xt = (1.0 - acp_prev) * np.sqrt(1.0 - beta) / (1.0 - acp)
  return coef_x0, coef_xt, var, np.log(np.maximum(var_clipped, 1e-20)), np.log(beta)


def learned_log_variance(var_out, log_var_min, log_var_max):
  """Interpolates between the clipped posterior log variance and log beta."""
  frac = (var_out + 1.0) / 2.0
  return frac * log_var_max + (1.0 - frac) * log_var_min


def vb_term(
  schedule: VPSchedule, x0: jax.Array, z: jax.Array, t: jax.Array, x0_hat: jax.Array, var_out
) -> jax.Array:
  """The VLB term L_t in bits per dimension, per example [B]; x0_hat should carry no gradient."""
  t_grid = np.arange(schedule.num_timesteps)[::-1]  # Descending, as in sampling.
  coef_x0, coef_xt, _, log_var, log_beta = (
    jnp.asarray(a[::-1], jnp.float32) for a in posterior(schedule.alphas_cumprod, t_grid)
  )  # Re-indexed so that entry t is the step t -> t - 1.

  def b(a):
    return a[t][:, None, None, None]

  true_mean = b(coef_x0) * x0 + b(coef_xt) * z
  model_mean = b(coef_x0) * x0_hat + b(coef_xt) * z
  model_log_var = learned_log_variance(var_out, b(log_var), b(log_beta))
  kl = normal_kl(true_mean, b(log_var), model_mean, model_log_var)
  kl = jnp.mean(kl, axis=(1, 2, 3)) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
  nll = jnp.mean(nll, axis=(1, 2, 3)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)
