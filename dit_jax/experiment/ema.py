"""Exponential and power-function EMAs of the parameters, and post-hoc EMA (EDM2).

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024),
Section 3 and Appendix C. After t updates with parameters p_1..p_t, a power-function EMA with
exponent gamma weighs the parameters by the profile

    f_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),  0 <= tau <= t,

(p_k standing for the interval (k-1, k]). Its relative standard deviation, the profile's std over
its length t, depends on gamma alone:

    sigma_rel(gamma)^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

so with s = sigma_rel^-2 the exponent is the largest real root of the cubic
gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0. The update

    ema_t = beta_t ema_{t-1} + (1 - beta_t) p_t,  beta_t = (1 - 1/t)^(gamma + 1),

gives p_k the weight (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) = the integral of f_t over
(k-1, k]: the discrete EMA is exactly the continuous profile applied to the step-wise parameters,
and beta_1 = 0, so the EMA's value before the first step never matters.

Post-hoc EMA: EMAs of a few profiles (gamma_i) saved at times t_i are each a linear function of
the parameter trajectory, so a weighted sum of them, sum_i x_i ema_i, has the profile
sum_i x_i f_i. The weights x that bring it closest (in L2 over tau) to a target profile f_r solve
the normal equations A x = b of the Gram matrix A_ij = <f_i, f_j> and b_i = <f_i, f_r>, with the
closed form (m = min(t_i, t_j))

    <f_i, f_j> = (gamma_i + 1)(gamma_j + 1) m^(gamma_i + gamma_j + 1)
                 / ((gamma_i + gamma_j + 1) t_i^(gamma_i + 1) t_j^(gamma_j + 1)).

Everything here is pure: numpy float64 for the post-hoc solve, jnp for the update.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax.config_defaults import EMA_KINDS
from dit_jax.errors import ConfigError, check_choice

# sigma_rel of gamma = 0 (the plain average of all steps so far). Exponents below 0 weigh the
# early parameters most; sigma_rel is not monotonic there, so they are not offered.
MAX_STD = 1 / math.sqrt(12)
# Largest relative L2 error of a reconstructed profile (see `posthoc_weights`) that
# `reconstructable_range` accepts.
MAX_RESIDUAL = 0.05


def std_to_gamma(std: float) -> float:
  """The exponent gamma >= 0 whose power-function EMA has relative std `std` in (0, MAX_STD]."""
  if not 0 < std <= MAX_STD:
    raise ValueError(f"sigma_rel={std} is outside (0, {MAX_STD:.5f}].")
  s = std**-2.0
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  gamma = float(roots[np.abs(roots.imag) < 1e-9 * (1 + np.abs(roots))].real.max())
  return max(gamma, 0.0)  # At MAX_STD the root is 0 up to rounding.


def gamma_to_std(gamma: float) -> float:
  """The relative std of the power-function EMA profile with exponent `gamma` > -1."""
  return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for train.ema fields (and sample.ema_index) that cannot work."""
  e = config.train.ema
  check_choice(e.kind, EMA_KINDS, "train.ema.kind")
  if e.snapshot_every < 0:
    raise ConfigError(f"config.train.ema.snapshot_every={e.snapshot_every} must be >= 0 (0 = off).")
  if config.sample.ema_index < 0:
    raise ConfigError(
      f"config.sample.ema_index={config.sample.ema_index} must be >= 0 (0 = the first EMA)."
    )
  if e.kind == "exponential":
    if e.snapshot_every:
      raise ConfigError(
        f"config.train.ema.snapshot_every={e.snapshot_every} needs power-function EMAs (post-hoc "
        "EMA reconstructs from them); set --config.train.ema.kind=power, or snapshot_every=0."
      )
    return
  std = tuple(e.std) if isinstance(e.std, (tuple, list)) else None
  if not std:
    raise ConfigError(
      f"config.train.ema.std={e.std!r} must be a non-empty tuple of relative stds when "
      "config.train.ema.kind='power', e.g. --config.train.ema.std='(0.05,0.1)'."
    )
  for value in std:
    if not (isinstance(value, (int, float)) and 0 < value <= MAX_STD):
      raise ConfigError(
        f"config.train.ema.std={std} holds {value!r}; each sigma_rel must be in (0, "
        f"{MAX_STD:.5f}] ({MAX_STD:.5f} = the plain average of all steps), e.g. (0.05, 0.1)."
      )
  if len(set(std)) != len(std):
    raise ConfigError(
      f"config.train.ema.std={std} repeats a value; each EMA costs 4 bytes per parameter, so "
      "list each sigma_rel once."
    )
  if config.sample.ema_index >= len(std):
    raise ConfigError(
      f"config.sample.ema_index={config.sample.ema_index} picks none of the {len(std)} EMAs of "
      f"config.train.ema.std={std}; choose 0..{len(std) - 1}."
    )


def gammas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """The exponents of the power EMAs a config tracks; () for the exponential EMA."""
  if config.train.ema.kind != "power":
    return ()
  return tuple(std_to_gamma(float(s)) for s in config.train.ema.std)


def init(params: Any, count: int) -> Any:
  """The EMA state at step 0: a copy of `params` (count 0: one exponential EMA) or a tuple of
  `count` copies (power EMAs), separate buffers since the train step donates the state."""
  if not count:
    return jax.tree.map(jnp.copy, params)
  return tuple(jax.tree.map(jnp.copy, params) for _ in range(count))


def power_beta(t: jax.Array, gamma: float) -> tuple[jax.Array, jax.Array]:
  """(beta_t, 1 - beta_t) in float32 for update t >= 1 (the count including this one).

  Through log1p/expm1: 1 - 1/t rounded to float32 would be off by up to 3% of 1/t at t = 1e6.
  """
  log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / jnp.asarray(t, jnp.float32))
  return jnp.exp(log_beta), -jnp.expm1(log_beta)


def update(ema: Any, params: Any, t: jax.Array, *, decay: float, gammas: Sequence[float]) -> Any:
  """The EMA state after update t (1 for the first) to `params`.

  With no `gammas`, one exponential EMA with `decay`; otherwise a tuple of power EMAs, one per
  exponent.
  """
  if not gammas:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
  assert isinstance(ema, tuple) and len(ema) == len(gammas), (type(ema), len(gammas))
  out = []
  for tree, gamma in zip(ema, gammas, strict=True):
    beta, weight = power_beta(t, gamma)
    out.append(jax.tree.map(lambda e, p, b=beta, w=weight: b * e + w * p, tree, params))
  return tuple(out)


def select(ema: Any, config: ml_collections.ConfigDict) -> Any:
  """The EMA that samples and evaluations during training use (config.sample.ema_index)."""
  if isinstance(ema, tuple):
    return ema[config.sample.ema_index]
  return ema


def _log_gram(t1, g1, t2, g2) -> np.ndarray:
  """log <f_1, f_2> of power profiles (times t, exponents g; broadcast), float64."""
  t1, g1, t2, g2 = (np.asarray(x, np.float64) for x in (t1, g1, t2, g2))
  m = np.minimum(t1, t2)
  return (
    np.log(g1 + 1)
    + np.log(g2 + 1)
    - np.log(g1 + g2 + 1)
    + (g1 + g2 + 1) * np.log(m)
    - (g1 + 1) * np.log(t1)
    - (g2 + 1) * np.log(t2)
  )


def posthoc_weights(
  times: Sequence[float], exps: Sequence[float], target_time: float, target_gammas: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Weights x (float64, one per stored EMA) with sum_i x_i f_i closest to each target profile,
  and the relative L2 error ||sum_i x_i f_i - f_r|| / ||f_r|| of each fit.

  Args:
    times: the step t_i at which each stored EMA was saved (> 0).
    exps: the exponent gamma_i of each stored EMA.
    target_time: the step at which the target profiles end (profiles are scale-free, so times
      are measured in units of it).
    target_gammas: the targets' exponents, a scalar or [K].

  Returns:
    x [N] and the error (a float) for a scalar target; x [N, K] and errors [K] otherwise.
  """
  t = np.asarray(times, np.float64) / target_time
  g = np.asarray(exps, np.float64)
  assert t.ndim == 1 and t.shape == g.shape and (t > 0).all(), (t, g)
  scalar = np.ndim(target_gammas) == 0
  gt = np.atleast_1d(np.asarray(target_gammas, np.float64))  # [K]
  gram = np.exp(_log_gram(t[:, None], g[:, None], t[None, :], g[None, :]))  # [N, N]
  b = np.exp(_log_gram(t[:, None], g[:, None], 1.0, gt[None, :]))  # [N, K]
  # The least-squares solution of minimum norm: the Gram matrix of many snapshots is close to
  # singular (neighbouring profiles are nearly parallel), which lstsq's cutoff of small singular
  # values handles; one factorization serves every target.
  x = np.linalg.lstsq(gram, b, rcond=None)[0]  # [N, K]
  target_norm2 = (gt + 1) ** 2 / (2 * gt + 1)  # [K]
  err2 = target_norm2 - 2 * np.sum(x * b, 0) + np.sum(x * (gram @ x), 0)
  err = np.sqrt(np.maximum(err2, 0.0) / target_norm2)
  return (x[:, 0], float(err[0])) if scalar else (x, err)


def reconstructable_range(
  times: Sequence[float], exps: Sequence[float], target_time: float
) -> tuple[float, float] | None:
  """The interval of sigma_rel whose profiles the stored EMAs reproduce within MAX_RESIDUAL
  (relative L2), scanned on a grid; None if there is none."""
  grid = np.geomspace(1e-3, MAX_STD, 200)
  _, err = posthoc_weights(times, exps, target_time, [std_to_gamma(float(s)) for s in grid])
  good = grid[err <= MAX_RESIDUAL]
  if not len(good):
    return None
  return float(good.min()), float(good.max())


def extra_bytes_per_param(count: int, snapshots: int = 0) -> dict[str, int]:
  """Bytes per parameter (float32) that `count` power EMAs add over one exponential EMA: on each
  device's share of the state and in each checkpoint, and on disk for `snapshots` snapshots."""
  return {"state": 4 * (count - 1), "snapshots_on_disk": 4 * count * snapshots}


def check_resume(saved_config: dict | None, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises ConfigError if the run saved in `where` (its config as saved, None if unknown) tracked
  other EMAs than `config` would: a power EMA cannot change its profile in the middle of a run."""
  if saved_config is None:
    return
  saved = saved_config.get("train", {}).get("ema", {"kind": "exponential"})
  kind, std = saved.get("kind"), tuple(saved.get("std") or ())
  ours = config.train.ema
  if kind == ours.kind and (kind != "power" or std == tuple(ours.std)):
    return
  theirs = f"kind={kind!r}" + (f", std={std}" if kind == "power" else "")
  mine = f"kind={ours.kind!r}" + (f", std={tuple(ours.std)}" if ours.kind == "power" else "")
  raise ConfigError(
    f"The checkpoints in {where} track train.ema {theirs}, but this run has {mine}; resume with "
    "the same train.ema settings, or start a new workdir from these weights with "
    "--config.train.init_from."
  )
