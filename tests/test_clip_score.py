"""The CLIP score: the Flax CLIP image tower against transformers' CLIPModel (random weights of
ViT-L/14's widths, shrunk in depth), the score against one computed with transformers, and
`--mode=evaluate` reporting it beside the other scores of a text model."""

import json
import os
import shutil

import _stand_in_inception
import _tiny_text_encoders as tiny
import jax
import numpy as np
import pytest

from dit_jax import parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import checks, clip_score, runner
from dit_jax.models import clip
from dit_jax.train import loop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _clip_model(directory, text, vision, projection, seed=0):
  config = transformers.CLIPConfig(
    text_config=text, vision_config=vision, projection_dim=projection
  )
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A small CLIPModel with a tokenizer (that of the tiny CLIP text encoders)."""
  root = tmp_path_factory.mktemp("clip")
  tokenizer_dir = tiny.save_clip(str(root / "tok"), 32, 16, max_positions=16, seed=0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  directory = str(root / "clip")
  text = dict(
    vocab_size=len(tokenizer),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    eos_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  vision = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
  )
  model = _clip_model(directory, text, vision, 24)
  for name in os.listdir(tokenizer_dir):
    if name not in ("config.json", "model.safetensors"):
      shutil.copy(os.path.join(tokenizer_dir, name), directory)
  return directory, model, tokenizer


def test_image_tower_matches_transformers_at_vit_l14_widths(tmp_path):
  text = dict(
    vocab_size=100,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=1,
    num_attention_heads=12,
  )
  vision = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=2,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
  )
  model = _clip_model(str(tmp_path), text, vision, 768)
  loaded = clip.load_hf(str(tmp_path))
  assert (loaded.vision.grid, loaded.vision.width, loaded.vision.projection_dim) == (16, 1024, 768)
  pixels = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  ours = jax.jit(clip.CLIPVision(loaded.vision).apply)({"params": loaded.vision_params}, pixels)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
  np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-4)
  assert np.abs(ref.numpy()).max() > 0.1
  assert loaded.logit_scale == pytest.approx(float(model.logit_scale.exp()))


def _reference_score(model, tokenizer, images, captions):
  """100 x max(cos, 0), averaged, with transformers' towers (CLIP's normalization by hand)."""
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(clip.IMAGE_MEAN, np.float32)) / np.asarray(clip.IMAGE_STD, np.float32)
  ids = tokenizer(
    captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
  )
  with torch.no_grad():
    img = model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    txt = model.get_text_features(input_ids=ids.input_ids)
  img = (img if isinstance(img, torch.Tensor) else img.pooler_output).numpy()
  txt = (txt if isinstance(txt, torch.Tensor) else txt.pooler_output).numpy()
  cos = np.sum(img * txt, -1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
  return float(np.mean(100 * np.maximum(cos, 0)))


def test_score_matches_transformers(small):
  directory, model, tokenizer = small
  mesh = parallel.make_mesh(base_config(), jax.devices()[:1])
  scorer = clip_score.ClipScorer.load(directory, mesh, batch_size=4)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # The model's size: no resize.
  captions = ["a red cat", "two dogs", "x", "", "a very long caption past sixteen tokens", "b"]
  ours = scorer.score(scorer.image_features(images), captions)["clip_score"]
  assert ours == pytest.approx(_reference_score(model, tokenizer, images, captions), abs=1e-3)
  # Other sizes are resized and centre-cropped; grayscale is tiled to RGB.
  assert scorer.image_features(images.repeat(2, axis=1)).shape == (6, 24)
  gray = images[..., :1]
  np.testing.assert_allclose(
    scorer.image_features(gray), scorer.image_features(gray.repeat(3, -1)), atol=1e-6
  )
  with pytest.raises(ConfigError, match="6 images but 2 captions"):
    scorer.score(scorer.image_features(images), captions[:2])


def test_clip_model_errors(small, tmp_path):
  config = base_config()
  config.eval.clip_model = small[0]
  with pytest.raises(ConfigError, match="takes none; leave eval.clip_model empty"):
    checks.check_config(config)
  config.model.name = "mmdit"
  config.eval.clip_model = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="is not a directory"):
    checks.check_config(config)
  mesh = parallel.make_mesh(base_config(), jax.devices()[:1])
  tiny.save_clip(str(tmp_path / "text_only"), 32, 16, max_positions=16, seed=0)
  with pytest.raises(ConfigError, match="not a CLIPModel with both towers"):
    clip_score.ClipScorer.load(str(tmp_path / "text_only"), mesh)


@pytest.mark.integration
def test_evaluate_reports_the_clip_score_of_text_models(small, tmp_path):
  c = base_config()
  c.model.name, c.model.variant, c.model.width, c.model.heads = "mmdit", "d2", 32, 2
  c.data.name, c.data.image_size, c.data.channels = "shapes", 16, 3
  c.train.batch_size, c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 8, 2, 2, 2
  c.sample.num_steps, c.sample.batch_size = 2, 8
  c.eval.num_images = 8
  c.eval.clip_model = small[0]
  workdir = str(tmp_path)
  loop.run(c, workdir)
  results = runner.evaluate(c, workdir)
  assert 0.0 <= results["clip_score"] <= 100.0 and "accuracy" in results
  with open(os.path.join(workdir, "eval", "eval.json")) as f:
    assert json.load(f)["clip_score"] == results["clip_score"]


@pytest.mark.integration
def test_the_chunked_evaluation_keeps_clip_features_beside_the_inceptions(
  small, monkeypatch, tmp_path
):
  # Latents of a tiny random VAE with captions encoded by encode_text: the path of real text
  # data, whose samples are decoded and scored chunk by chunk by the FID Inception (its stand-in:
  # the subject is the chunks around the network).
  _stand_in_inception.patch(monkeypatch)
  inception_weights = _stand_in_inception.write(str(tmp_path / "inception.npz"))
  from dit_jax.models import autoencoder
  from dit_jax.tools import encode_text

  vae = autoencoder.AutoencoderConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8),
    layers_per_block=1,
    norm_num_groups=4,
  )
  vae_dir = str(tmp_path / "vae")
  autoencoder.save_diffusers(vae_dir, vae, autoencoder.random_params(vae, seed=0))

  root = tmp_path / "enc"
  enc = {"clip_l": tiny.save_clip(str(root / "clip_l"), 32, 16, max_positions=8, seed=0)}
  encoders = encode_text.load_encoders(enc, clip_max_length=8)
  data_dir = str(tmp_path / "data")
  captions = [f"caption {i}" for i in range(16)]
  encode_text.write(captions, encoders, data_dir, batch_size=8, dtype="float32")
  latents = np.random.default_rng(0).standard_normal((16, 8, 8, 4)).astype(np.float32)
  np.save(os.path.join(data_dir, "latents.npy"), latents)

  c = base_config()
  c.model.name, c.model.variant, c.model.width, c.model.heads = "mmdit", "d2", 32, 2
  c.data.name, c.data.path, c.data.image_size, c.data.channels = "latents", data_dir, 8, 4
  c.vae.path, c.data.latent_scale = vae_dir, vae.scaling_factor
  c.train.batch_size, c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 8, 2, 2, 2
  c.sample.num_steps, c.sample.batch_size = 2, 4
  c.eval.num_images, c.eval.batch_size = 4, 4  # The reference: 4 of the data's images too.
  c.eval.inception_weights, c.eval.clip_model = inception_weights, small[0]
  workdir = str(tmp_path / "run")
  loop.run(c, workdir)
  results = runner.evaluate(c, workdir)
  assert np.isfinite(results["fid"]) and 0.0 <= results["clip_score"] <= 100.0
  # Its chunks (Inception and CLIP features side by side) are removed once scored.
  assert not os.path.exists(os.path.join(workdir, "eval", "eval.parts"))
