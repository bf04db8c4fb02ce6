"""A latent DiT end to end: images -> VAE latents -> train (grids decoded) -> --mode=sample writes
decoded uint8 images, the same on 1 and 8 devices."""

import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dit_jax import parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import hooks, runner, sampling
from dit_jax.models import autoencoder
from dit_jax.tools import encode_latents
from dit_jax.train import loop

pytestmark = [pytest.mark.integration, pytest.mark.sharding]

IMAGE, FACTOR = 16, 2  # Pixels per side; the tiny VAE halves them once.
VAE_CONFIG = autoencoder.AutoencoderConfig(
  block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4
)


def latent_config(data_dir: str, vae_dir: str):
  c = base_config()
  c.model.variant, c.model.num_classes = "tiny/2", 4
  # The official DiT's latent setting: learned variance, 3 of the 4 channels guided.
  c.model.learn_sigma, c.diffusion.objective = True, "eps"
  c.sample.sampler, c.sample.guided_channels = "ddpm", 3
  c.data.name, c.data.path = "latents", data_dir
  c.data.image_size, c.data.channels = IMAGE // FACTOR, 4
  c.data.latent_scale = VAE_CONFIG.scaling_factor
  c.vae.path = vae_dir
  c.train.batch_size, c.train.num_steps = 16, 4
  c.train.log_every = c.train.checkpoint_every = 4
  c.train.lr = 1e-3
  # Chunks of 6 images: padded to 8 on 8 devices, not padded on 1.
  c.sample.num_steps, c.sample.num_images, c.sample.batch_size = 3, 10, 6
  c.sample.guidance_scale = 2.0
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir): a tiny random VAE, the latents of 32 images made with encode_latents, and
  a latent DiT trained on them for 4 steps with config.vae.path set."""
  root = tmp_path_factory.mktemp("latent")
  vae_dir, data_dir, folder = str(root / "vae"), str(root / "data"), root / "images"
  autoencoder.save_diffusers(vae_dir, VAE_CONFIG, autoencoder.random_params(VAE_CONFIG, seed=0))
  rng = np.random.default_rng(0)
  for i in range(32):
    (folder / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"class{i % 4}" / f"{i}.png")
  config = latent_config(data_dir, vae_dir)
  meta = encode_latents.encode_latents(
    config, vae_dir, data_dir, source="folder", source_path=str(folder), batch_size=16
  )
  assert meta.count == 32 and meta.scaling_factor == VAE_CONFIG.scaling_factor
  workdir = str(root / "run")
  loop.run(config, workdir, hooks.TrainingHooks(workdir))
  return config, workdir


def test_training_grid_is_decoded(run):
  _, workdir = run
  with Image.open(os.path.join(workdir, "images", "step_0000004.png")) as grid:
    # 10 images of 16 x 16 pixels in a 4 x 3 grid (1-pixel gaps), upscaled 128 // 16 = 8 times.
    assert grid.mode == "RGB" and grid.size == ((4 * 17 + 1) * 8, (3 * 17 + 1) * 8)


def test_sample_decodes_the_same_images_on_1_and_8_devices(run):
  config, workdir = run
  with np.load(runner.sample(config, workdir)) as f:
    images, labels = f["arr_0"], f["labels"]
  assert images.dtype == np.uint8 and images.shape == (10, IMAGE, IMAGE, 3)
  np.testing.assert_array_equal(labels, np.arange(10) % 4)
  assert images.std() > 0
  assert os.path.exists(os.path.join(workdir, "samples", "samples.png"))
  one = config.copy_and_resolve_references()
  one.sample.name = "one_device"
  with np.load(runner.sample(one, workdir, devices=jax.devices()[:1])) as f:
    np.testing.assert_array_equal(f["arr_0"], images)


def test_latent_scale_or_channels_of_another_vae_are_clear_errors(run):
  config, workdir = run
  other = config.copy_and_resolve_references()
  other.data.latent_scale = 1.0
  with pytest.raises(ConfigError, match=r"latent_scale=1.0 but .* scaling_factor=0.18215"):
    runner.sample(other, workdir, overwrite=True)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  other = config.copy_and_resolve_references()
  other.data.channels = 3
  with pytest.raises(ConfigError, match="has 4 latent channels but the model makes"):
    sampling.load_decoder(other, mesh)
  other.data.channels, other.vae.path = 4, os.path.join(workdir, "no_vae_here")
  with pytest.raises(ConfigError, match="no_vae_here"):
    sampling.load_decoder(other, mesh)


def test_without_vae_latents_are_written_and_one_line_says_how_to_decode(run, caplog):
  config, workdir = run
  bare = config.copy_and_resolve_references()
  bare.vae.path, bare.sample.name = "", "latents"
  with caplog.at_level(logging.INFO):
    path = runner.sample(bare, workdir)
  with np.load(path) as f:
    assert set(f.files) == {"latents", "labels"}
    assert f["latents"].dtype == np.float32 and f["latents"].shape == (10, 8, 8, 4)
  hints = [r for r in caplog.records if "--config.vae.path=DIR" in r.getMessage()]
  assert len(hints) == 1


def test_grids_and_in_training_fid_share_one_vae(run, tmp_path, monkeypatch):
  """A run with image grids and in-training FID loads its VAE once (it used to load one for
  each), and the evaluation still decodes: its FID is logged."""
  import _stand_in_inception

  from dit_jax import vae as vae_lib

  config, _ = run
  _stand_in_inception.patch(monkeypatch)
  loads = []
  real = vae_lib.VAE.load.__func__
  monkeypatch.setattr(
    vae_lib.VAE, "load", classmethod(lambda cls, *a, **k: loads.append(a[0]) or real(cls, *a, **k))
  )
  c = config.copy_and_resolve_references()
  c.eval.inception_weights = _stand_in_inception.write(str(tmp_path / "inception.npz"))
  c.train.update(eval_every=4, eval_num_images=8)
  workdir = str(tmp_path / "run")
  loop.run(c, workdir, hooks.TrainingHooks(workdir))
  assert loads == [c.vae.path]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    scores = [json.loads(line) for line in f if '"fid"' in line]
  assert [s["step"] for s in scores] == [4] and np.isfinite(scores[0]["fid"]), scores
