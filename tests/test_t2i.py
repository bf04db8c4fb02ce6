"""Text-to-image end to end with a tiny MMDiT: the built-in shapes captions (train -> sample ->
evaluate), and the production path (latents + text embeddings from dit_jax.tools.encode_text)."""

import json
import os

import numpy as np
import pytest

from dit_jax import data, experiment
from dit_jax.config_defaults import base_config
from dit_jax.data import shapes
from dit_jax.errors import ConfigError
from dit_jax.evaluation import runner
from dit_jax.train import loop

pytestmark = [pytest.mark.integration]


def tiny_t2i(**data_fields):
  c = base_config()
  c.model.name, c.model.variant, c.model.width, c.model.heads = "mmdit", "d2", 64, 2
  c.data.name, c.data.image_size, c.data.channels = "shapes", 16, 3
  for k, v in data_fields.items():
    c.data[k] = v
  c.train.batch_size, c.train.num_steps = 8, 4
  c.train.log_every, c.train.checkpoint_every = 2, 4
  c.sample.num_steps, c.sample.num_images, c.sample.batch_size = 3, 10, 8
  c.sample.guidance_scale = 3.0
  c.eval.num_images = 16
  return c


def test_shapes_train_sample_evaluate(tmp_path):
  config = tiny_t2i()
  workdir = str(tmp_path)
  metrics = loop.run(config, workdir)
  assert np.isfinite(metrics["loss"])

  path = runner.sample(config, workdir)
  with np.load(path) as f:
    images, captions = f["arr_0"], list(f["captions"])
  assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8
  held_out = shapes.held_out_captions()
  assert captions == [held_out[i % len(held_out)] for i in range(10)]

  results = runner.evaluate(config, workdir)
  for key in ("accuracy", "colour_accuracy", "shape_accuracy", "position_accuracy"):
    assert 0.0 <= results[key] <= 1.0
  with open(os.path.join(workdir, "eval", "eval.json")) as f:
    assert json.load(f)["num_images"] == 16

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a blue square at the top left\n\na red triangle at the bottom right\n")
  config.sample.prompts, config.sample.name = str(prompts), "mine"
  with np.load(runner.sample(config, workdir)) as f:
    assert list(f["captions"])[:3] == [
      "a blue square at the top left",
      "a red triangle at the bottom right",
      "a blue square at the top left",
    ]
  prompts.write_text("a purple circle at the top left\n")
  with pytest.raises(ConfigError, match="purple"):
    runner.sample(config, workdir, overwrite=True)
  config.sample.prompts, config.sample.name = "", "inline"
  config.sample.prompt_text = "a green circle at the bottom left | a yellow square at the top right"
  with np.load(runner.sample(config, workdir)) as f:
    assert list(f["captions"])[:2] == [
      "a green circle at the bottom left",
      "a yellow square at the top right",
    ]


def test_wrong_model_or_sizes_for_text_data_are_clear_errors():
  config = tiny_t2i()
  config.model.name = "dit"
  with pytest.raises(ConfigError, match="mmdit"):
    data.build_source(config)
  config = tiny_t2i()
  config.model.context_dim = 64
  with pytest.raises(ConfigError, match="context_dim=32"):
    experiment.build(config)
  config = tiny_t2i()
  config.data.name = "digits"
  with pytest.raises(ConfigError, match="no captions"):
    experiment.build(config)


def _tiny_encoders(tmp_path):
  """(paths, loaded encoders) of a tiny random CLIP-L (8 tokens) and T5 (6 tokens)."""
  import _tiny_text_encoders as tiny

  from dit_jax.tools import encode_text

  paths = {
    "clip_l": tiny.save_clip(str(tmp_path / "clip_l"), 32, 16, max_positions=8, seed=0),
    "t5": tiny.save_t5(str(tmp_path / "t5"), 48, seed=1),
  }
  return paths, encode_text.load_encoders(paths, clip_max_length=8, t5_max_length=6)


def test_latents_with_encoded_text_train_and_sample(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")

  from dit_jax.tools import encode_text

  paths, encoders = _tiny_encoders(tmp_path)
  data_dir = str(tmp_path / "data")
  captions = [f"caption {i}" for i in range(16)]
  spec, _ = encode_text.write(captions, encoders, data_dir, batch_size=8, dtype="float16")
  latents = np.random.default_rng(0).standard_normal((16, 8, 8, 4)).astype(np.float16)
  np.save(os.path.join(data_dir, "latents.npy"), latents)

  config = tiny_t2i(name="latents", path=data_dir, image_size=8, channels=4)
  exp = experiment.build(config)
  assert exp.conditioner.spec.context_len == 8 + 6 and [s.name for s in spec.encoders] == [
    "clip_l",
    "t5",
  ]
  # The unconditional input is the empty caption's encoding, not zeros.
  np.testing.assert_array_equal(exp.conditioner.spec.null_context, spec.null_context)
  assert np.abs(spec.null_pooled).max() > 0

  workdir = str(tmp_path / "run")
  assert np.isfinite(loop.run(config, workdir)["loss"])
  prompts_dir = str(tmp_path / "prompts")
  encode_text.write(["a new prompt", "another"], encoders, prompts_dir, dtype="float32")
  config.sample.prompts = prompts_dir
  with np.load(runner.sample(config, workdir)) as f:
    assert f["latents"].shape == (10, 8, 8, 4) and np.isfinite(f["latents"]).all()
    assert list(f["captions"])[:3] == ["a new prompt", "another", "a new prompt"]
  # Prompts encoded with other text sizes than the training data's: one clear error.
  clip_only = encode_text.load_encoders({"clip_l": paths["clip_l"]}, clip_max_length=8)
  encode_text.write(["x"], clip_only, str(tmp_path / "other"), dtype="float32")
  config.sample.prompts = str(tmp_path / "other")
  with pytest.raises(ConfigError, match="encode the prompts with the encoders"):
    runner.sample(config, workdir, overwrite=True)


def test_text_beside_latents_in_a_bucket_resumes_trains_and_samples(gcs, tmp_path):
  """encode_text into a gs:// directory of ArrayRecord latents writes ArrayRecord text shards
  (the latents' shard size), resumes a killed run to the bytes of an uninterrupted local one,
  refuses to mix inputs, and an MMDiT trains on the bucket and samples prompts from it."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import _gcs

  from dit_jax import storage
  from dit_jax.data import records, text
  from dit_jax.tools import encode_text

  paths, encoders = _tiny_encoders(tmp_path)
  url = gcs.url("t2i")
  _gcs.write_latents(url, count=16, shard_size=8)
  captions = [f"caption {i}" for i in range(16)]
  names = records.shard_names(text.SHARD_KIND, 16, 8)
  # Killed after 3 batches of 4: the first shard is whole, the second not begun; not complete.
  encode_text.write(captions, encoders, url, batch_size=4, max_batches=3)
  assert [n for n in storage.listdir(url) if n.startswith("text-")] == names[:1]
  assert not storage.isfile(storage.join(url, text.SPEC_FILE))
  with pytest.raises(ConfigError, match="holds no text embeddings"):
    text.TextSpec.load(url)
  encode_text.write(captions, encoders, url, batch_size=4)
  assert text.stored_layout(url) == text.StoredText(records.FORMAT, 16, 8)
  local = str(tmp_path / "local")
  encode_text.write(captions, encoders, local, batch_size=4, format=records.FORMAT, shard_size=8)
  for name in names:
    assert storage.read_bytes(storage.join(url, name)) == storage.read_bytes(
      storage.join(local, name)
    ), name
  # The same values as the memory-mapped layout, row by row and gathered.
  npy = str(tmp_path / "npy")
  encode_text.write(captions, encoders, npy, batch_size=4)
  (context, pooled), (want_context, want_pooled) = data.open_text(url), data.open_text(npy)
  rows = np.array([[15, 0], [8, 7]])
  np.testing.assert_array_equal(context[rows], np.asarray(want_context)[rows])
  np.testing.assert_array_equal(pooled[3], want_pooled[3])
  assert context.shape == want_context.shape and context.dtype == np.float16

  # Other captions into the same shards, or a caption count that is not the latents': refused.
  with pytest.raises(ConfigError, match="other inputs.*--overwrite"):
    encode_text.write([f"a {c}" for c in captions], encoders, url, batch_size=4)
  with pytest.raises(ConfigError, match="15 captions, but --out=.* holds 16 latents"):
    encode_text.write(captions[:15], encoders, url, batch_size=4)
  assert storage.read_bytes(storage.join(url, names[1])) == storage.read_bytes(
    storage.join(local, names[1])
  )
  other = [f"a {c}" for c in captions]  # (A suffix would be cut: 8 CLIP tokens.)
  encode_text.write(
    other, encoders, local, batch_size=4, format=records.FORMAT, shard_size=8, overwrite=True
  )
  assert text.stored_layout(local) == text.StoredText(records.FORMAT, 16, 8)
  assert storage.read_bytes(storage.join(url, names[0])) != storage.read_bytes(
    storage.join(local, names[0])
  )
  with pytest.raises(ConfigError, match="--format=npy writes memory-mapped files"):
    encode_text.write(captions, encoders, gcs.url("npy"), format="npy")

  config = tiny_t2i(name="latents", path=url, image_size=8, channels=4, latent_scale=0.18215)
  workdir = gcs.url("t2i-run")
  assert np.isfinite(loop.run(config, workdir)["loss"])
  prompts = gcs.url("prompts")
  encode_text.write(["a new prompt", "another"], encoders, prompts, dtype="float32")
  config.sample.prompts = prompts
  path = runner.sample(config, workdir)
  samples = storage.load_npz(path)
  assert samples["latents"].shape == (10, 8, 8, 4) and np.isfinite(samples["latents"]).all()
  assert list(samples["captions"])[:3] == ["a new prompt", "another", "a new prompt"]
