"""What the network predicts, and the identities that convert between predictions.

With z = alpha * x0 + sigma * eps:
- eps:            the network predicts eps.
- v:              v = alpha * eps - sigma * x0 (VP, alpha^2 + sigma^2 = 1).
- rectified_flow: u = eps - x0, the velocity dz/dt of the straight path (alpha = 1 - t, sigma = t).
All functions broadcast alpha and sigma against the arrays ([B, 1, 1, 1] against [B, H, W, C]).
"""

import jax
import jax.numpy as jnp

OBJECTIVES = ("eps", "v", "rectified_flow")


def target(objective: str, x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array):
  """The regression target of `objective` (also: the ideal output given the true x0, eps)."""
  if objective == "eps":
    return eps
  if objective == "v":
    return alpha * eps - sigma * x0
  if objective == "rectified_flow":
    return eps - x0
  raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")


def to_x0_eps(
  objective: str, out: jax.Array, z: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Inverts `target`: from a network output at z, returns the implied (x0, eps)."""
  if objective == "eps":
    return (z - sigma * out) / alpha, out
  if objective == "v":
    return alpha * z - sigma * out, sigma * z + alpha * out
  if objective == "rectified_flow":
    # z = (1 - t) x0 + t eps and u = eps - x0, so x0 = z - t u and eps = z + (1 - t) u.
    return z - sigma * out, z + alpha * out
  raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")


def edm_input_scale(alpha: jax.Array, sigma: jax.Array, sigma_data: float) -> jax.Array:
  """EDM's c_in (Karras et al. 2022) for z = alpha x0 + sigma eps: the factor that gives the
  network a unit-variance input when x0 has standard deviation `sigma_data`."""
  return jax.lax.rsqrt(sigma**2 + (alpha * sigma_data) ** 2)


def edm_output(
  objective: str,
  f: jax.Array,
  z: jax.Array,
  alpha: jax.Array,
  sigma: jax.Array,
  sigma_data: float,
) -> jax.Array:
  """The objective's output implied by a raw network output `f` under EDM preconditioning.

  The network predicts a unit-scale correction to the best linear guess of x0 (exact for data
  with mean 0 and standard deviation `sigma_data`); in EDM's variables y = z / alpha and noise
  level s = sigma / alpha, x0_hat = c_skip(s) y + c_out(s) f with c_skip = sd^2 / (s^2 + sd^2) and
  c_out = s sd / sqrt(s^2 + sd^2). Written with n^2 = sigma^2 + alpha^2 sd^2 so that it stays
  finite at alpha = 0 and sigma = 0. With f = 0 it is the exact denoiser of N(0, sd^2) data, so an
  untrained network already outputs the right trivial answer at every noise level: an
  eps-network then need not learn to copy its input at high noise to within alpha / sigma.
  """
  sd = sigma_data
  n2 = sigma**2 + (alpha * sd) ** 2
  n = jnp.sqrt(n2)
  x0 = (sd**2 * alpha * z + sigma * sd * n * f) / n2
  eps = (sigma * z - alpha * sd * n * f) / n2
  return target(objective, x0, eps, alpha, sigma)


def eps_from_x0(z: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (z - alpha * x0) / sigma


def snr(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (alpha / sigma) ** 2


def loss_weight(
  weighting: str, objective: str, alpha: jax.Array, sigma: jax.Array, gamma: float = 5.0
) -> jax.Array:
  """Per-example weight of the objective's MSE.

  `min_snr` (Hang et al. 2023) caps the eps-space weight at min(SNR, gamma) / SNR. For v and
  rectified flow, eps - eps_hat = alpha * (target - output), so their MSE is rescaled by alpha^2
  to give the same effective weighting.
  """
  if weighting == "none":
    return jnp.ones_like(alpha)
  if weighting == "min_snr":
    w = jnp.minimum(1.0, gamma / jnp.maximum(snr(alpha, sigma), 1e-20))
    return w if objective == "eps" else w * alpha**2
  raise ValueError(f"Unknown loss weighting {weighting!r}; choose 'none' or 'min_snr'.")
