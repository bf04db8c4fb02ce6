"""Each training timestep sampler draws from its analytic density (SD3 §3.1): KS / chi^2 tests."""

import jax
import numpy as np
import pytest
from scipy import special, stats

from dit_jax.diffusion import Diffusion, FlowSchedule, timesteps
from dit_jax.diffusion.schedules import vp_schedule

N = 200_000
P_MIN = 1e-3  # The draws use a fixed key, so a pass is deterministic; this guards against bugs.


def _mode_cdf(scale):
  u = np.linspace(0.0, 1.0, 200_001)
  f = 1 - u - scale * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)  # Decreasing in u for valid scales.
  return lambda t: 1.0 - np.interp(t, f[::-1], u[::-1])


CDFS = {
  "uniform": (dict(), lambda t: t),
  "logit_normal": (
    dict(logit_mean=0.3, logit_std=0.8),
    lambda t: stats.norm.cdf((special.logit(np.clip(t, 1e-12, 1 - 1e-12)) - 0.3) / 0.8),
  ),
  "mode": (dict(mode_scale=1.29), _mode_cdf(1.29)),
  "cosmap": (dict(), lambda t: 2 / np.pi * np.arctan(t / np.maximum(1 - t, 1e-12))),
}


@pytest.mark.parametrize("name", sorted(CDFS))
def test_sampler_matches_density(name):
  kwargs, cdf = CDFS[name]
  t = np.asarray(timesteps.sample_unit_time(name, jax.random.key(0), (N,), **kwargs), np.float64)
  assert t.min() >= 0.0 and t.max() <= 1.0
  assert stats.kstest(t, cdf).pvalue > P_MIN
  # A different distribution must be rejected: the test has power.
  other = "cosmap" if name == "uniform" else "uniform"
  assert stats.kstest(t, CDFS[other][1]).pvalue < 1e-6


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shifted_uniform_density(shift):
  u = timesteps.sample_unit_time("uniform", jax.random.key(1), (N,))
  t = np.asarray(timesteps.shift_time(u, shift), np.float64)
  # t' = s t / (1 + (s - 1) t) inverts to t = t' / (s - (s - 1) t').
  assert stats.kstest(t, lambda x: x / (shift - (shift - 1) * x)).pvalue > P_MIN


@pytest.mark.parametrize("name", ["logit_normal", "cosmap"])
def test_vp_schedule_maps_sampler_onto_integer_steps(name):
  kwargs, cdf = CDFS[name]
  diff = Diffusion(
    schedule=vp_schedule("linear", 100), objective="eps", timestep_sampler=name, **kwargs
  )
  t = np.asarray(diff.sample_t(jax.random.key(2), N))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 99
  counts = np.bincount(t, minlength=100)
  edges = np.linspace(0, 1, 101)
  expected = N * np.diff(cdf(edges))
  keep = expected > 5  # The chi^2 approximation needs populated bins.
  expected_kept = expected[keep] * counts[keep].sum() / expected[keep].sum()
  assert stats.chisquare(counts[keep], expected_kept).pvalue > P_MIN


def test_flow_training_times_are_continuous():
  diff = Diffusion(schedule=FlowSchedule(), objective="rectified_flow", shift=3.0)
  t = np.asarray(diff.sample_t(jax.random.key(3), 1000))
  assert t.dtype == np.float32 and len(np.unique(t)) == 1000
  assert np.mean(t) > 0.6  # Shift 3 moves mass towards noise (mean of uniform is 0.5).


def test_resolution_shift():
  assert timesteps.resolution_shift(1.0, 64, 32) == 2.0
  assert timesteps.resolution_shift(1.5, 64, 0) == 1.5
