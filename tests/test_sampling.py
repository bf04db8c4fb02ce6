"""Chunked, resumable sampling (--mode=sample) and classifier-free guidance of some channels."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import experiment
from dit_jax.config_defaults import base_config
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.evaluation import guides, sampling


def tiny_config():
  c = base_config()
  c.model.variant = "tiny/4"
  c.model.learn_sigma = True
  c.diffusion.objective = "eps"
  c.data.image_size, c.data.channels = 16, 3
  c.sample.guided_channels = 2
  # DDPM draws fresh noise at every step: a resumed chunk must draw the same.
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 3
  c.sample.num_images = 20
  c.sample.batch_size = 8  # Chunks [0, 8), [8, 16), [16, 20) on 8 devices.
  c.sample.guidance_scale = 2.0
  return c


@pytest.fixture(scope="module")
def model():
  """(experiment, params, sampler) of a tiny DiT with random parameters (the zero-initialized
  output layer would make every prediction zero); the sampler is compiled once for all tests."""
  exp = experiment.build(tiny_config())
  leaves, tree = jax.tree.flatten(exp.init_state().ema_params)
  rng = np.random.default_rng(0)
  noisy = [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  params = jax.device_put(jax.tree.unflatten(tree, noisy), exp.param_shardings)
  return exp, params, sampling.make_sampler(exp)


def _sample(exp, params, workdir, name, run=None, step=3, seed=0):
  path = sampling.write_samples(
    exp, params, workdir, name=name, num_images=20, seed=seed, step=step, run=run
  )
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _killed_after(monkeypatch, chunks: int, firsts: list[int]):
  """Makes sampling stop (as if killed) when chunk number `chunks` (from 0) is done, before it
  is written; records where each sampling call starts."""
  real = sampling.sample_chunks

  def chunked(*args, **kwargs):
    firsts.append(kwargs.get("first", 0))
    for i, item in enumerate(real(*args, **kwargs)):
      if i == chunks:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(sampling, "sample_chunks", chunked)


def test_killed_sampling_resumes_to_the_same_file(model, tmp_path, monkeypatch):
  exp, params, run = model
  workdir = str(tmp_path)
  straight = _sample(exp, params, workdir, "straight", run)
  assert straight["arr_0"].shape == (20, 16, 16, 3) and straight["arr_0"].dtype == np.uint8
  assert straight["arr_0"].std() > 0
  np.testing.assert_array_equal(straight["labels"], np.arange(20) % 10)
  assert not os.path.exists(os.path.join(workdir, "samples", "straight.parts"))

  parts = os.path.join(workdir, "samples", "resumed.parts")
  firsts = []
  with monkeypatch.context() as m:
    _killed_after(m, 2, firsts)
    with pytest.raises(KeyboardInterrupt):
      _sample(exp, params, workdir, "resumed", run)
  assert sorted(os.listdir(parts)) == ["00000000-00000008.npy", "00000008-00000016.npy"] + [
    sampling.FINGERPRINT_FILE
  ]
  assert not os.path.exists(os.path.join(workdir, "samples", "resumed.npz"))
  # A chunk cut short by the kill is only ever a temporary file, which does not count.
  with open(os.path.join(parts, "00000016-00000020.npy.tmp"), "wb") as f:
    f.write(b"\x93NUMPY half a chunk")

  # Another config, seed or checkpoint must not mix its images with these chunks.
  other, smaller = tiny_config(), tiny_config()
  other.sample.guidance_scale = 1.5
  smaller.sample.batch_size = 4  # DDPM's images depend on the chunk size.
  for args, field in (
    ((experiment.build(other), params, workdir, "resumed"), "sample.guidance_scale"),
    ((experiment.build(smaller), params, workdir, "resumed"), "sample.batch_size"),
    ((exp, params, workdir, "resumed", None, 3, 1), "sample.seed"),
    ((exp, params, workdir, "resumed", None, 4), "checkpoint_step"),
  ):
    with pytest.raises(ConfigError, match=rf"{field}=.* there, .* here.*delete that directory"):
      _sample(*args)

  with monkeypatch.context() as m:
    _killed_after(m, 99, firsts)
    resumed = _sample(exp, params, workdir, "resumed", run)
  assert firsts == [0, 16]  # The rerun sampled only the last chunk.
  assert resumed.keys() == straight.keys()
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k])
  assert not os.path.exists(parts)
  assert os.path.exists(os.path.join(workdir, "samples", "resumed.png"))


def test_guidance_of_some_channels_is_the_official_dit_formula():
  """DiT's forward_with_cfg guides the first 3 channels of the model output; the 4th latent
  channel and the learned variance (channels 4..7) come from the conditional half."""
  config = base_config()
  config.data.channels, config.sample.guided_channels = 4, 3
  n = guides.guided_channels(config)
  scale = 4.0
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
  t = jnp.asarray([10.0, 500.0])
  w = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)

  def apply(z, t, c):  # [B, H, W, 8]: 4 mean and 4 variance channels, depending on the label.
    return jnp.tanh(z @ w + c["label"][:, None, None, None] * 0.3 + t[:, None, None, None] / 1e3)

  cond, null = {"label": jnp.asarray([2.0, 7.0])}, {"label": jnp.asarray([10.0, 10.0])}
  got = guidance.guided(apply, cond, null, scale, n)(z, t)

  c_out, u_out = np.asarray(apply(z, t, cond)), np.asarray(apply(z, t, null))
  eps_c, eps_u = c_out[..., :3], u_out[..., :3]
  half_eps = eps_u + scale * (eps_c - eps_u)
  want = np.concatenate([half_eps, c_out[..., 3:]], axis=-1)
  assert got.shape == (2, 4, 4, 8)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(want[..., 3], u_out[..., 3])  # Channel 3 is the conditional one.

  config.sample.guided_channels = 0  # All of the 4 mean channels.
  assert guides.guided_channels(config) == 4


def test_sampler_guides_the_configured_channels(model, monkeypatch):
  exp, params, _ = model
  seen = []
  real = guidance.guided

  def spy(apply, cond, null, scale, guided_channels, **kwargs):
    seen.append(guided_channels)
    return real(apply, cond, null, scale, guided_channels, **kwargs)

  monkeypatch.setattr(guidance, "guided", spy)
  images, _ = sampling.generate(exp, params, 8, seed=0, progress=False)
  assert seen == [2] and images.shape == (8, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("value", [-1, 5])
def test_bad_guided_channels_is_a_clear_error(value):
  config = tiny_config()
  config.data.channels, config.sample.guided_channels = 4, value
  with pytest.raises(ConfigError, match=rf"sample.guided_channels={value} must be between 0"):
    sampling.make_sampler(experiment.build(config))
