"""Identities of the diffusion math: conversions, exact sampling of Gaussian data, guidance, VLB."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.config_defaults import base_config
from dit_jax.diffusion import Diffusion, FlowSchedule, build_diffusion, guidance, objectives, vlb
from dit_jax.diffusion.samplers import time_grid
from dit_jax.diffusion.schedules import vp_schedule
from dit_jax.errors import ConfigError

MU, STD = 0.3, 0.5  # Gaussian "data" per pixel: x0 ~ N(MU, STD^2).


def _diffusion(objective: str, **kw) -> Diffusion:
  schedule = FlowSchedule() if objective == "rectified_flow" else vp_schedule("linear")
  return Diffusion(schedule=schedule, objective=objective, **kw)


def _optimal_denoiser(diff: Diffusion):
  """The exact denoiser for Gaussian data, returned in the objective's own parametrization."""

  def denoise(z, model_t):
    t = model_t / 1000.0 if isinstance(diff.schedule, FlowSchedule) else model_t.astype(jnp.int32)
    alpha, sigma = diff.alpha_sigma(t)
    x0 = MU + alpha * STD**2 * (z - alpha * MU) / (alpha**2 * STD**2 + sigma**2)
    eps = (z - alpha * x0) / sigma
    return objectives.target(diff.objective, x0, eps, alpha, sigma)

  return denoise


@pytest.mark.parametrize("objective", ["eps", "v", "rectified_flow"])
def test_conversions_round_trip(objective):
  diff = _diffusion(objective)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (16, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = diff.sample_t(k3, 16)
  alpha, sigma = diff.alpha_sigma(t)
  z = alpha * x0 + sigma * eps
  out = objectives.target(objective, x0, eps, alpha, sigma)
  x0_back, eps_back = objectives.to_x0_eps(objective, out, z, alpha, sigma)
  # eps -> x0 divides by alpha, which is small at high noise; compare where it is well conditioned.
  ok = (alpha > 0.05) & (sigma > 0.05)
  np.testing.assert_allclose(np.where(ok, x0_back, x0), x0, atol=2e-4)
  np.testing.assert_allclose(np.where(ok, eps_back, eps), eps, atol=2e-4)
  # And the other objectives' outputs follow from (x0, eps).
  for other in ("eps", "v", "rectified_flow"):
    if (other == "rectified_flow") == (objective == "rectified_flow"):
      expect = objectives.target(other, x0, eps, alpha, sigma)
      got = objectives.target(other, x0_back, eps_back, alpha, sigma)
      np.testing.assert_allclose(np.where(ok, got, expect), expect, atol=5e-4)


def _expected_ode_result(diff, noise, t_start):
  """The probability-flow ODE of Gaussian data keeps the standardized value of z fixed."""
  alpha, sigma = diff.schedule.alpha_sigma(jnp.asarray(t_start))
  return MU + STD * (noise - alpha * MU) / jnp.sqrt(alpha**2 * STD**2 + sigma**2)


@pytest.mark.parametrize(
  "objective,sampler,steps,tol",
  [
    ("rectified_flow", "euler", 200, 2e-2),
    ("rectified_flow", "heun", 50, 1e-3),
    ("eps", "heun", 100, 2e-3),
    ("v", "euler", 500, 2e-2),
    ("eps", "ddim", 1000, 1e-2),
    ("v", "heun", 100, 2e-3),
  ],
)
def test_ode_samplers_are_exact_on_gaussian_data(objective, sampler, steps, tol):
  diff = _diffusion(objective)
  noise = jax.random.normal(jax.random.key(1), (64, 2, 2, 1))
  out = jax.jit(
    lambda n: diff.sample(
      _optimal_denoiser(diff), n, sampler=sampler, num_steps=steps, rng=jax.random.key(2)
    )
  )(noise)
  t_start = time_grid(diff.schedule, steps)[0]
  np.testing.assert_allclose(out, _expected_ode_result(diff, noise, t_start), atol=tol)


def test_heun_converges_faster_than_euler():
  diff = _diffusion("rectified_flow")
  noise = jax.random.normal(jax.random.key(1), (64, 2, 2, 1))
  expect = _expected_ode_result(diff, noise, 1.0)
  errs = {}
  for sampler in ("euler", "heun"):
    out = diff.sample(
      _optimal_denoiser(diff), noise, sampler=sampler, num_steps=10, rng=jax.random.key(0)
    )
    errs[sampler] = float(jnp.max(jnp.abs(out - expect)))
  assert errs["heun"] < errs["euler"] / 5, errs


def test_vp_euler_equals_ddim_eta0():
  diff = _diffusion("eps")
  noise = jax.random.normal(jax.random.key(3), (8, 2, 2, 1))
  kw = dict(num_steps=25, rng=jax.random.key(0))
  a = diff.sample(_optimal_denoiser(diff), noise, sampler="euler", **kw)
  b = diff.sample(_optimal_denoiser(diff), noise, sampler="ddim", eta=0.0, **kw)
  np.testing.assert_allclose(a, b, atol=1e-4)


# With x0_hat = E[x0 | z] and variance beta_tilde, each ancestral step misses the variance of
# x0 given z; that error vanishes only as the steps get small, so these run the full 1000 steps.
@pytest.mark.parametrize("sampler,eta,steps", [("ddpm", 0.0, 1000), ("ddim", 1.0, 1000)])
def test_stochastic_samplers_match_gaussian_moments(sampler, eta, steps):
  diff = _diffusion("eps")
  noise = jax.random.normal(jax.random.key(4), (4096, 2, 2, 1))
  out = jax.jit(
    lambda n: diff.sample(
      _optimal_denoiser(diff), n, sampler=sampler, num_steps=steps, rng=jax.random.key(5), eta=eta
    )
  )(noise)
  # 16k draws: the standard error of the mean is STD / 128 ~ 0.004.
  assert abs(float(out.mean()) - MU) < 0.02
  assert abs(float(out.std()) - STD) < 0.02


def test_ddpm_learned_variance_at_minus_one_equals_fixed():
  diff = _diffusion("eps")
  learned = Diffusion(schedule=diff.schedule, objective="eps", learn_sigma=True)
  base = _optimal_denoiser(diff)

  def with_var(z, t):
    return jnp.concatenate([base(z, t), -jnp.ones_like(z)], axis=-1)

  noise = jax.random.normal(jax.random.key(6), (32, 2, 2, 1))
  kw = dict(sampler="ddpm", num_steps=50, rng=jax.random.key(7))
  np.testing.assert_allclose(
    learned.sample(with_var, noise, **kw), diff.sample(base, noise, **kw), atol=1e-5
  )


def test_guidance_scale_one_is_conditional_and_scale_extrapolates():
  def apply(z, t, c):  # A pytree of conditioning, as text models take.
    scale = 1.0 + c["label"][:, None, None, None].astype(z.dtype) + c["pooled"][:, :1, None, None]
    return z * scale + t[:, None, None, None]

  z = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
  t = jnp.arange(4.0)
  labels = {"label": jnp.array([0, 1, 2, 3]), "pooled": jnp.ones((4, 3))}
  null = {"label": jnp.full((4,), 10), "pooled": jnp.zeros((4, 3))}
  cond = apply(z, t, labels)
  # Scale 1 takes the plain conditional path; the batched path agrees with it too.
  np.testing.assert_array_equal(guidance.guided(apply, labels, null, 1.0, 2)(z, t), cond)
  np.testing.assert_array_equal(guidance.classifier_free_guidance(cond, cond * 0.3, 1.0), cond)
  uncond = apply(z, t, null)
  g = guidance.guided(apply, labels, null, 4.0, 1)(z, t)
  np.testing.assert_allclose(g[..., :1], (uncond + 4.0 * (cond - uncond))[..., :1], rtol=1e-5)
  np.testing.assert_array_equal(g[..., 1:], cond[..., 1:])  # Unguided (variance) channels.


def test_vb_term_zero_for_true_posterior_and_positive_otherwise():
  schedule = vp_schedule("linear")
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jnp.clip(jax.random.normal(k1, (8, 4, 4, 1)) * 0.5, -1, 1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([1, 5, 10, 100, 300, 500, 800, 999])
  alpha, sigma = (a[:, None, None, None] for a in schedule.alpha_sigma(t))
  z = alpha * x0 + sigma * eps
  # var_out = -1 selects the posterior variance beta_tilde: with the true x0 the KL vanishes.
  kl = vlb.vb_term(schedule, x0, z, t, x0, -jnp.ones_like(x0))
  np.testing.assert_allclose(kl, 0.0, atol=1e-5)
  assert float(jnp.min(vlb.vb_term(schedule, x0, z, t, x0 + 0.1, -jnp.ones_like(x0)))) > 0
  # log beta differs from log beta_tilde mostly at small t (they converge as t grows).
  wrong_var = vlb.vb_term(schedule, x0, z, t, x0, jnp.ones_like(x0))
  assert float(jnp.min(wrong_var[:4])) > 1e-5, wrong_var
  # At t = 0 the term is the decoder's discretized NLL in bits: finite, and worse for a wrong mean.
  t0 = jnp.zeros((8,), jnp.int32)
  a0, s0 = (a[:, None, None, None] for a in schedule.alpha_sigma(t0))
  z0 = a0 * x0 + s0 * eps
  nll = vlb.vb_term(schedule, x0, z0, t0, x0, -jnp.ones_like(x0))
  nll_off = vlb.vb_term(schedule, x0, z0, t0, x0 + 0.05, -jnp.ones_like(x0))
  assert bool(jnp.all(jnp.isfinite(nll))) and bool(jnp.all(nll_off > nll + 1.0)), (nll, nll_off)


def test_discretized_likelihood_sums_to_one():
  bins = jnp.linspace(-1.0, 1.0, 256)
  ll = vlb.discretized_gaussian_log_likelihood(bins, 0.1, jnp.log(0.3))
  np.testing.assert_allclose(jnp.sum(jnp.exp(ll)), 1.0, atol=1e-4)


def test_min_snr_weighting_agrees_across_objectives():
  """min-SNR gives the same eps-space weight whichever quantity the network predicts."""
  schedule = vp_schedule("linear")
  t = jnp.array([10, 100, 500, 900])
  alpha, sigma = (a[:, None, None, None] for a in schedule.alpha_sigma(t))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0, eps = jax.random.normal(k1, (4, 2, 2, 1)), jax.random.normal(k2, (4, 2, 2, 1))
  x0_hat = x0 + 0.1 * jax.random.normal(k3, x0.shape)
  z = alpha * x0 + sigma * eps
  eps_hat = objectives.eps_from_x0(z, x0_hat, alpha, sigma)
  losses = {}
  for obj in ("eps", "v"):
    err = (
      objectives.target(obj, x0, eps, alpha, sigma)
      - objectives.target(obj, x0_hat, eps_hat, alpha, sigma)
    ) ** 2
    w = objectives.loss_weight("min_snr", obj, alpha, sigma, 5.0)
    losses[obj] = (w * err).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses["eps"], losses["v"], rtol=1e-4)


@pytest.mark.parametrize("objective", ["eps", "v", "rectified_flow"])
def test_edm_preconditioning_of_a_zero_network_is_the_gaussian_denoiser(objective):
  """With EDM preconditioning a network that outputs 0 is already the exact denoiser of
  N(0, sigma_data^2) data, whatever the objective; sampling with it reproduces that data."""
  diff = _diffusion(objective, preconditioning="edm", sigma_data=STD)
  k1, k2 = jax.random.split(jax.random.key(0))
  z = jax.random.normal(k1, (8, 2, 2, 1))
  t = diff.sample_t(k2, 8)
  alpha, sigma = diff.alpha_sigma(t)
  zero_net = lambda z, model_t: jnp.zeros_like(z)  # noqa: E731
  out, var_out = diff.network_output(zero_net, z, t, alpha, sigma)
  x0 = alpha * STD**2 * z / (alpha**2 * STD**2 + sigma**2)
  expect = objectives.target(objective, x0, (z - alpha * x0) / sigma, alpha, sigma)
  assert var_out is None
  np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-5)
  if objective != "eps":
    return
  noise = jax.random.normal(jax.random.key(1), (64, 2, 2, 1))
  sample = diff.sample(zero_net, noise, sampler="heun", num_steps=100, rng=jax.random.key(2))
  alpha0, sigma0 = diff.schedule.alpha_sigma(jnp.asarray(999))
  np.testing.assert_allclose(sample, STD * noise / jnp.hypot(alpha0 * STD, sigma0), atol=2e-3)


@pytest.mark.parametrize("objective", ["eps", "v", "rectified_flow"])
def test_edm_output_reaches_every_target_and_is_finite_at_the_ends(objective):
  """Some network output gives exactly the true target (the parametrization loses nothing), at
  every time including rectified flow's t = 0 and t = 1, where a naive form divides by zero."""
  sd = 0.7
  diff = _diffusion(objective)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x0 = jax.random.normal(k1, (6, 2, 2, 1))
  eps = jax.random.normal(k2, x0.shape)
  t = diff.sample_t(k3, 6)
  if objective == "rectified_flow":
    t = t.at[:2].set(jnp.array([0.0, 1.0]))
  alpha, sigma = diff.alpha_sigma(t)
  z = alpha * x0 + sigma * eps
  n = jnp.sqrt(sigma**2 + (alpha * sd) ** 2)
  f_true = jnp.where(sigma > 0, (x0 - sd**2 * alpha * z / n**2) * n / (sd * sigma), 0.0)
  out = objectives.edm_output(objective, f_true, z, alpha, sigma, sd)
  expect = objectives.target(objective, x0, eps, alpha, sigma)
  ok = sigma > 0  # At sigma = 0 (flow t = 0) x0 = z whatever f is; check only finiteness there.
  np.testing.assert_allclose(np.where(ok, out, expect), expect, atol=1e-4)
  assert np.all(np.isfinite(objectives.edm_output(objective, x0, z, alpha, sigma, sd)))


def test_flow_time_grid_and_shift():
  grid = time_grid(FlowSchedule(), 4, shift=3.0)
  t_min = 3 * 0.001 / (1 + 2 * 0.001)  # The smallest training time, shifted.
  unit = np.linspace(1.0, t_min, 4)
  np.testing.assert_allclose(grid, 3 * unit / (1 + 2 * unit), rtol=1e-6)
  assert grid[0] == 1.0 and np.all(np.diff(grid) < 0)
  vp = time_grid(vp_schedule("linear"), 10)
  assert vp[0] == 999 and vp[-1] == 0 and np.all(np.diff(vp) < 0)


@pytest.mark.parametrize(
  "objective,expect", [("eps", "min_snr"), ("v", "none"), ("rectified_flow", "none")]
)
def test_auto_loss_weighting_is_min_snr_for_eps_only(objective, expect):
  c = base_config()
  c.diffusion.objective, c.diffusion.loss_weighting = objective, "auto"
  assert build_diffusion(c).loss_weighting == expect


def test_build_diffusion_errors_name_the_field():
  c = base_config()
  c.diffusion.objective = "x0"
  with pytest.raises(ConfigError, match="diffusion.objective"):
    build_diffusion(c)
  c = base_config()
  c.diffusion.timestep_sampler = "beta"
  with pytest.raises(ConfigError, match="diffusion.timestep_sampler"):
    build_diffusion(c)
  c = base_config()
  c.diffusion.preconditioning = "karras"
  with pytest.raises(ConfigError, match="diffusion.preconditioning"):
    build_diffusion(c)
  c = base_config()
  c.diffusion.sigma_data = 0.0
  with pytest.raises(ConfigError, match="diffusion.sigma_data"):
    build_diffusion(c)


# --- Respacing as in the released DiT ----------------------------------------------------------


def _space_timesteps(num_timesteps: int, num_steps: int) -> set[int]:
  """DiT's `space_timesteps(T, str(n))` (one section), written out as the reference reads: a float
  position advanced by the stride, rounded by Python's round (half to even) at each step."""
  stride = 1 if num_steps <= 1 else (num_timesteps - 1) / (num_steps - 1)
  position, taken = 0.0, []
  for _ in range(num_steps):
    taken.append(round(position))
    position += stride
  return set(taken)


def test_vp_grid_is_the_official_respacing_for_every_step_count():
  schedule = vp_schedule("linear")
  # Known cases: the float sums round 499.4999... down where an even split would give 500.
  assert 499 in time_grid(schedule, 21) and 500 not in time_grid(schedule, 21)
  assert list(time_grid(schedule, 1)) == [0]  # One step is the reference's t = 0.
  assert list(time_grid(schedule, 2)) == [999, 0]
  assert list(time_grid(schedule, 250)[-6:]) == [20, 16, 12, 8, 4, 0]
  np.testing.assert_array_equal(time_grid(schedule, 1000), np.arange(999, -1, -1))
  for n in range(1, 1001):
    grid = time_grid(schedule, n)
    assert len(grid) == n and np.all(np.diff(grid) < 0) and grid.dtype == np.int32, n
    assert set(grid.tolist()) == _space_timesteps(1000, n), n


def test_ddpm_on_the_grid_is_the_respaced_process():
  """Along the grid, the posterior is that of the process with the respaced betas
  1 - alpha_bar(t_i) / alpha_bar(t_{i-1}) (SpacedDiffusion), including its learned-range ends."""
  from dit_jax.diffusion.schedules import VPSchedule

  acp = vp_schedule("linear").alphas_cumprod
  grid = time_grid(vp_schedule("linear"), 27)
  ascending = grid[::-1]
  respaced = VPSchedule(1.0 - acp[ascending] / np.append(1.0, acp[ascending[:-1]]))
  ours = vlb.posterior(acp, grid)
  theirs = vlb.posterior(respaced.alphas_cumprod, np.arange(len(grid))[::-1])
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
