"""The Flax text encoders (dit_jax.models.clip, dit_jax.models.t5) against transformers' PyTorch
models, on random weights of SD3's real configurations shrunk in depth (and in vocabulary, which
only sizes a lookup table): CLIP-L/14, OpenCLIP bigG/14 and T5-XXL (v1.1). Also their sharding
over 8 devices, bfloat16 compute, and the errors of their loaders.
"""

import json
import os

import jax
import numpy as np
import pytest

from dit_jax import parallel, text_encoders, utils
from dit_jax.errors import ConfigError
from dit_jax.models import clip, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 1000
# SD3's encoders with two layers: CLIP-L (openai, whose config.json keeps the legacy
# eos_token_id=2: pooled at argmax(ids)), OpenCLIP bigG (pooled at the first end-of-text token).
CLIP_L = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_attention_heads=12,
  projection_dim=768,
  hidden_act="quick_gelu",
  eos_token_id=2,
)
CLIP_G = dict(
  hidden_size=1280,
  intermediate_size=5120,
  num_attention_heads=20,
  projection_dim=1280,
  hidden_act="gelu",
  eos_token_id=VOCAB - 1,
)
T5_XXL = dict(
  d_model=4096,
  d_kv=64,
  d_ff=10240,
  num_heads=64,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj="gated-gelu",
)


def _save_clip(directory, sizes, depth=2, seed=0):
  config = transformers.CLIPTextConfig(
    vocab_size=VOCAB, num_hidden_layers=depth, max_position_embeddings=77, **sizes
  )
  torch.manual_seed(seed)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  model.save_pretrained(directory)
  return model


def _save_t5(directory, sizes, depth, seed=0):
  config = transformers.T5Config(
    vocab_size=VOCAB, num_layers=depth, is_encoder_decoder=False, use_cache=False, **sizes
  )
  torch.manual_seed(seed)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(directory)
  return model


def _ids(length, eos, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB - 1, (3, length)).astype(np.int32)
  for row, end in enumerate((5, length - 1, 1)):  # Short, full and one-token captions.
    ids[row, end] = eos
    ids[row, end + 1 :] = eos if eos == VOCAB - 1 else 0
  return ids


def _torch(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)


@pytest.mark.parametrize("name,sizes", [("clip_l", CLIP_L), ("clip_g", CLIP_G)])
def test_clip_matches_transformers_on_the_real_config(name, sizes, tmp_path):
  model = _save_clip(str(tmp_path), sizes)
  config, params = clip.load_text_hf(str(tmp_path))
  assert (config.width, config.heads, config.activation) == (
    sizes["hidden_size"],
    sizes["num_attention_heads"],
    sizes["hidden_act"],
  )
  eos = VOCAB - 1  # The highest id: the end-of-text token of both pooling rules.
  ids = _ids(77, eos)
  ours = jax.jit(clip.CLIPText(config).apply)({"params": params}, ids)
  ref = _torch(model, ids)
  for key, want in (
    ("penultimate", ref.hidden_states[-2]),  # SD3's sequence features
    ("last", ref.last_hidden_state),
    ("text_embeds", ref.text_embeds),  # SD3's pooled vector
  ):
    want = want.numpy()
    np.testing.assert_allclose(ours[key], want, rtol=0, atol=1e-4, err_msg=key)
    assert np.abs(want).max() > 0.1, key  # Not a comparison of zeros.


def test_t5_xxl_matches_transformers_on_the_real_config(tmp_path):
  # One layer at T5-XXL's width (193M parameters) keeps the test in seconds; the depth-2 check
  # below runs the shared position bias through a second layer.
  model = _save_t5(str(tmp_path), T5_XXL, depth=1)
  config, params = t5.load_hf(str(tmp_path))
  assert (config.width, config.heads, config.head_dim, config.mlp_dim) == (4096, 64, 64, 10240)
  assert config.activation == "gelu_new" and config.gated
  ids = _ids(40, 1)
  ours = jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids)
  ref = _torch(model, ids)
  np.testing.assert_allclose(ours["last"], ref.last_hidden_state.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours["penultimate"], ref.hidden_states[-2].numpy(), atol=1e-4)


def test_t5_layers_share_the_position_bias_as_transformers(tmp_path):
  sizes = dict(T5_XXL, d_model=256, d_kv=16, d_ff=512, num_heads=16)
  model = _save_t5(str(tmp_path), sizes, depth=3, seed=1)
  config, params = t5.load_hf(str(tmp_path))
  ids = _ids(300, 1)  # Past max_distance: the logarithmic buckets and the last one.
  ours = jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids)
  ref = _torch(model, ids)
  np.testing.assert_allclose(ours["last"], ref.last_hidden_state.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours["penultimate"], ref.hidden_states[-2].numpy(), atol=1e-4)


def test_relative_buckets_equal_transformers():
  attention = transformers.models.t5.modeling_t5.T5Attention
  for length, buckets, distance in ((300, 32, 128), (77, 8, 128), (50, 32, 16)):
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = attention._relative_position_bucket(rel, True, buckets, distance).numpy()
    np.testing.assert_array_equal(t5.relative_buckets(length, buckets, distance), want)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  root = tmp_path_factory.mktemp("small")
  _save_clip(
    str(root / "clip"),
    dict(CLIP_G, hidden_size=64, intermediate_size=128, num_attention_heads=4, projection_dim=32),
  )
  _save_t5(str(root / "t5"), dict(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_heads=4), depth=2)
  return {"clip": str(root / "clip"), "t5": str(root / "t5")}


@pytest.mark.sharding
def test_sharded_over_8_devices_equals_one_device(small):
  mesh1 = text_encoders.make_mesh("1,1,1", jax.devices()[:1])
  mesh8 = text_encoders.make_mesh("2,2,2", jax.devices()[:8])
  for module, (config, params) in (
    (clip.CLIPText, clip.load_text_hf(small["clip"])),
    (t5.T5Encoder, t5.load_hf(small["t5"])),
  ):
    net = module(config)
    ids = _ids(24, VOCAB - 1)[:2].repeat(4, axis=0)  # 8 rows: one per data-parallel device
    one = text_encoders.place_params(net, params, ids.shape, mesh1, parallel.PRESETS["fsdp_tp"])
    out1 = text_encoders.make_forward(net, one, mesh1, parallel.PRESETS["fsdp_tp"], lambda o: o)(
      ids
    )
    placed = text_encoders.place_params(net, params, ids.shape, mesh8, parallel.PRESETS["fsdp_tp"])
    # The layers' kernels are split over fsdp (embed) and tensor (heads, mlp).
    assert (
      len(placed["layers"]["wo" if module is t5.T5Encoder else "fc2"]["kernel"].sharding.device_set)
      == 8
    )
    out8 = text_encoders.make_forward(net, placed, mesh8, parallel.PRESETS["fsdp_tp"], lambda o: o)(
      ids
    )
    for key in out1:
      np.testing.assert_allclose(out8[key], out1[key], rtol=0, atol=1e-5, err_msg=key)


def test_bfloat16_compute_stays_close_to_float32(small):
  for module, load in ((clip.CLIPText, clip.load_text_hf), (t5.T5Encoder, t5.load_hf)):
    config, params = load(small["clip" if module is clip.CLIPText else "t5"])
    _, params16 = load(small["clip" if module is clip.CLIPText else "t5"], "bfloat16")
    assert jax.tree.leaves(params16)[0].dtype == jax.numpy.bfloat16
    ids = _ids(24, VOCAB - 1)
    f32 = module(config).apply({"params": params}, ids)
    b16 = module(config, jax.numpy.bfloat16).apply({"params": params16}, ids)
    for key in f32:
      assert b16[key].dtype == np.float32, key  # The residual stream stays float32.
      err = np.abs(np.asarray(b16[key]) - f32[key]).max() / np.abs(f32[key]).max()
      assert 0 < err < 0.03, (key, err)


def test_loader_errors_name_the_problem(small, tmp_path):
  with pytest.raises(ConfigError, match="holds no config.json, so it is not a saved"):
    clip.load_text_hf(str(tmp_path))
  with pytest.raises(ConfigError, match="holds a t5, not a CLIP text encoder"):
    clip.load_text_hf(small["t5"])
  with pytest.raises(ConfigError, match="holds a clip_text_model, not a T5 encoder"):
    t5.load_hf(small["clip"])
  # A config that promises more layers than the weights hold.
  bad = tmp_path / "bad"
  os.makedirs(bad)
  for name in os.listdir(small["t5"]):
    os.link(os.path.join(small["t5"], name), bad / name)
  cfg = json.loads((bad / "config.json").read_text())
  os.remove(bad / "config.json")
  (bad / "config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
  with pytest.raises(
    ConfigError, match="has no tensor 'encoder.block.2.*the weights and the config"
  ):
    t5.load_hf(str(bad))
  (bad / "config.json").write_text(json.dumps(dict(cfg, d_ff=96)))
  with pytest.raises(ConfigError, match="has shape .* but its config.json implies"):
    t5.load_hf(str(bad))
  os.remove(bad / "model.safetensors")
  with pytest.raises(ConfigError, match="holds no \\*.safetensors file"):
    t5.load_hf(str(bad))


def test_twins_of_depth_1_and_2_extrapolate_to_the_full_depth_count():
  # What the benchmark and the AOT check print for the released encoders, checked once against
  # the unrolled full-depth program of CLIP-L (12 layers; small enough to compile here).
  mesh = text_encoders.make_mesh("1,1,1", jax.devices()[:1])
  counts = [
    utils.xla_flops(text_encoders.compile_forward("clip_l", mesh, 1, 8, "float32", depth))
    for depth in (1, 2, 12)
  ]
  assert counts[1] > 1.5 * counts[0]  # The twins differ by a layer's cost.
  assert text_encoders.extrapolate(counts[0], counts[1], 12) == pytest.approx(counts[2], rel=1e-5)


def test_a_clip_without_projection_is_refused_for_sd3(tmp_path):
  config = transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
  )
  transformers.CLIPTextModel(config).save_pretrained(str(tmp_path))
  loaded, params = clip.load_text_hf(str(tmp_path))  # The tower itself loads, with no projection.
  assert loaded.projection_dim == 0 and "text_projection" not in params
  mesh = text_encoders.make_mesh("1,1,1", jax.devices()[:1])
  with pytest.raises(ConfigError, match="CLIPTextModel without the text projection"):
    text_encoders.load_encoder("clip_l", str(tmp_path), 77, mesh)
  with pytest.raises(ConfigError, match="^t5: .* holds a clip_text_model, not a T5 encoder"):
    text_encoders.load_encoder("t5", str(tmp_path), 77, mesh)
