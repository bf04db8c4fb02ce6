"""Aspect-ratio buckets (config.data.buckets): one bucket per global batch in an order fixed by the
seed, rectangular position crops, the per-size time shift, sampling at a bucket's size."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart_t2i
from dit_jax import data, models
from dit_jax.data import buckets, shapes
from dit_jax.diffusion import build_diffusion
from dit_jax.errors import ConfigError
from dit_jax.evaluation import sampling, shapes_checker
from dit_jax.models import layers, mmdit


def _config(**overrides):
  c = quickstart_t2i.get_config("buckets")
  c.train.batch_size = 8
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def test_parse_and_bad_sizes():
  assert buckets.parse("16x16, 12X20") == ((16, 16), (12, 20))
  assert buckets.parse("") == ()
  assert buckets.format_sizes(buckets.parse("16x16,12x20")) == "16x16,12x20"
  assert buckets.scaled(buckets.SDXL_1024[:2], 8) == ((128, 128), (112, 144))
  for bad in ("16", "16x", "0x16", "16x16,16x16", "axb"):
    with pytest.raises(ConfigError, match="config.data.buckets"):
      buckets.parse(bad)
  # A bucket whose size does not divide into the patch (d4 has patch 2).
  with pytest.raises(ConfigError, match="13x20 does not divide into patches of 2"):
    models.build_model(_config(**{"data.buckets": "16x16,13x20"}), shapes.text_spec())
  with pytest.raises(ConfigError, match="is for config.model.name='mmdit'"):
    c = _config()
    c.model.name, c.model.variant, c.data.name, c.data.channels = "dit", "S/2", "digits", 1
    models.build_model(c)
  with pytest.raises(ConfigError, match="does not fit the position table of 10"):
    models.build_model(_config(**{"sample.size": "8x24"}), shapes.text_spec())
  assert buckets.nearest(100, 200, buckets.parse("16x16,12x20,20x12")) == 1


def test_batches_hold_one_bucket_and_split_over_processes():
  bucket_of = np.arange(100) % 3  # 34, 33, 33 elements.
  batches = buckets.BucketBatches(bucket_of, 3, 8, seed=5)
  assert batches.batches_per_epoch == 4 + 4 + 4
  seen = []
  for k in range(2 * batches.batches_per_epoch):
    b, rows = batches(k)
    assert np.all(bucket_of[rows] == b) and len(set(rows.tolist())) == 8
    seen.append(rows)
  epoch0 = np.concatenate(seen[:12])
  assert len(set(epoch0.tolist())) == 96  # No element twice within an epoch.
  assert not np.array_equal(np.concatenate(seen[12:]), epoch0)  # Reshuffled.
  again = buckets.BucketBatches(bucket_of, 3, 8, seed=5)
  assert all(np.array_equal(again(k)[1], seen[k]) for k in range(24))
  with pytest.raises(ConfigError, match="No bucket"):
    buckets.BucketBatches(bucket_of, 3, 64, seed=0)

  # The pipeline: the union of 2 processes' batches is the 1-process batch; resume is exact.
  c = _config()
  one = data.build_train_iterator(c, batch_size=8)
  halves = [
    data.build_train_iterator(c, batch_size=4, process_index=p, process_count=2) for p in (0, 1)
  ]
  shapes_seen = set()
  for _ in range(4):
    whole, parts = next(one), [next(h) for h in halves]
    shapes_seen.add(whole["image"].shape[1:3])
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
  assert shapes_seen == {(16, 16), (12, 20)}
  state = one.get_state()
  want = next(one)
  resumed = data.build_train_iterator(c, batch_size=8)
  resumed.set_state(state)
  got = next(resumed)
  for key in want:
    np.testing.assert_array_equal(want[key], got[key])


def test_position_crop_and_model_at_bucket_sizes():
  cfg = mmdit.MMDiTConfig(16, 3, 2, 32, 2, 2, 32, 32, pos_embed_max_size=10)
  table = layers.sincos_2d(32, 10, 10, spacing=1.0).reshape(10, 10, 32)
  # SD3's crop: centred in each direction.
  np.testing.assert_array_equal(mmdit.position_table(cfg, 6, 10), table[2:8, 0:10].reshape(60, 32))
  np.testing.assert_array_equal(mmdit.position_table(cfg), table[1:9, 1:9].reshape(64, 32))
  with pytest.raises(ValueError, match="does not fit"):
    mmdit.position_table(cfg, 12, 4)
  model = mmdit.MMDiT(cfg)
  cond = {"context": jnp.ones((2, 8, 32)), "pooled": jnp.ones((2, 32))}
  params = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros(2), cond)
  for h, w in ((16, 16), (12, 20), (8, 20)):
    out = model.apply(params, jnp.ones((2, h, w, 3)), jnp.full(2, 0.5), cond)
    assert out.shape == (2, h, w, 3)


def test_shift_per_bucket():
  c = _config(**{"diffusion.shift": 2.0, "diffusion.shift_base_resolution": 16})
  d = build_diffusion(c)
  assert d.shift == 2.0 and d.at_size(16, 16) is d
  assert math.isclose(d.at_size(12, 20).shift, 2.0 * math.sqrt(240) / 16)
  assert math.isclose(d.at_size(32, 32).shift, 4.0)  # SD3: x2 per doubling of the side.
  plain = build_diffusion(_config())
  assert plain.at_size(12, 20) is plain  # No resolution shift configured.


def test_shapes_at_a_bucket_size_read_back():
  rng = np.random.default_rng(0)
  for h, w in ((12, 20), (20, 12), (16, 24)):
    images, captions = [], []
    for colour, shape, position in [
      ("red", "circle", "top right"),
      ("blue", "square", "bottom left"),
    ]:
      images.append(shapes.render(colour, shape, position, (h, w), rng))
      captions.append(shapes.caption_of(colour, shape, position))
    assert images[0].shape == (h, w, 3)
    assert shapes_checker.score(np.stack(images), captions)["accuracy"] == 1.0
  with pytest.raises(ConfigError, match="sides in"):
    shapes.render("red", "circle", "top left", (8, 20))
  # The square size is unchanged by the rectangular path.
  square = shapes.render("red", "circle", "top left", 16, np.random.default_rng(3))
  np.testing.assert_array_equal(
    square, shapes.render("red", "circle", "top left", (16, 16), np.random.default_rng(3))
  )


def test_sample_size():
  assert sampling.sample_size(_config()) == (16, 16)
  assert sampling.sample_size(_config(**{"sample.size": "12x20"})) == (12, 20)
  with pytest.raises(ConfigError, match="give one HxW"):
    sampling.sample_size(_config(**{"sample.size": "12x20,16x16"}))


def test_unbucketed_sources_refuse_buckets():
  c = _config(**{"data.name": "digits", "data.channels": 1})
  c.model.name, c.model.variant = "dit", "S/2"
  with pytest.raises(data.DataError, match="cannot be trained in buckets; .*encode_latents"):
    data.build_source(c, bucketed=True)


def test_train_step_lowers_for_every_bucket():
  """What launch/aot_compile.py compiles per bucket: the train step with a batch of each
  bucket's shape (the same function, one program per shape)."""
  from dit_jax import experiment

  c = _config()
  exp = experiment.build(c, devices=jax.devices()[:1])
  for h, w in buckets.parse(c.data.buckets):
    batch = exp.abstract_batch(size=(h, w))
    assert batch["image"].shape == (8, h, w, 3)
    with exp.context():
      lowered = exp.jit_train_step().lower(exp.abstract_state, batch)
    assert f"tensor<8x{h}x{w}x3xf32>" in lowered.as_text()
  assert exp.abstract_batch()["image"].shape == (8, 16, 16, 3)  # data.image_size, square.
