"""The KL autoencoder: parity with diffusers' AutoencoderKL, its converter, and the mesh wrapper."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dit_jax import axes, parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.models import autoencoder as ae
from dit_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from dit_jax.vae import VAE

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Stable Diffusion's layout (quant convs, 4 latent channels) and SD3's (16 latent channels, a
# shift, no quant convs), both shrunk; the second has three levels (f = 4).
CONFIGS = {
  "sd": dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.18215,
  ),
  "sd3": dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
  ),
}
SIZE = 16


def _torch_vae(kwargs: dict, seed: int):
  n = len(kwargs["block_out_channels"])
  model = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kwargs
  ).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # Norm affines and biases too: none is a no-op.
      is_norm_scale = "norm" in name and name.endswith("weight")
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_norm_scale else 0.0))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{name: (torch model, diffusers directory)} of randomized small VAEs."""
  out = {}
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    model = _torch_vae(kwargs, seed=i)
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory, safe_serialization=True)
    out[name] = (model, directory)
  return out


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_outputs(model, images: np.ndarray, latents: np.ndarray):
  with torch.no_grad():
    dist = model.encode(_nchw(images)).latent_dist
    decoded = model.decode(_nchw(latents)).sample
  return _nhwc(dist.mean), _nhwc(dist.logvar), _nhwc(decoded)


def _inputs(config: AutoencoderConfig, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, SIZE, SIZE, config.in_channels)).astype(np.float32)
  h = SIZE // config.downsample_factor
  latents = rng.standard_normal((n, h, h, config.latent_channels)).astype(np.float32)
  return images, latents


@functools.cache
def _jitted(config: AutoencoderConfig):
  """Unsharded jitted (encode, decode) of the module, compiled once per config."""
  module = AutoencoderKL(config)
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))
  return encode, decode


def _jax_outputs(config, params, images, latents):
  encode, decode = _jitted(config)
  (mean, logvar), decoded = encode(params, images), decode(params, latents)
  return np.asarray(mean), np.asarray(logvar), np.asarray(decoded)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(saved, name):
  model, directory = saved[name]
  config, params = ae.load_diffusers(directory)
  assert config == AutoencoderConfig(**CONFIGS[name])
  images, latents = _inputs(config, 2)
  want = _torch_outputs(model, images, latents)
  got = _jax_outputs(config, params, images, latents)
  h = SIZE // config.downsample_factor
  assert got[0].shape == got[1].shape == (2, h, h, config.latent_channels)
  assert got[2].shape == images.shape
  for label, a, b in zip(("mean", "logvar", "decoded"), got, want, strict=True):
    assert np.abs(b).max() > 0.1, label  # The comparison is not between near-zero arrays.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=label)


def test_logvar_is_clipped_as_in_diffusers():
  config = AutoencoderConfig(**CONFIGS["sd"])
  params = ae.random_params(config, seed=0)
  # A huge quant_conv bias pushes the logvar half of the posterior out of [-30, 20].
  bias = params["quant_conv"]["bias"].copy()
  bias[config.latent_channels : config.latent_channels + 2] = (1e3, -1e3)
  params = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
  _, logvar, _ = _jax_outputs(config, params, *_inputs(config, 2))
  assert logvar[..., 0].min() == 20.0 and logvar[..., 1].max() == -30.0


def test_save_load_round_trip_and_diffusers_reads_it(tmp_path):
  config = AutoencoderConfig(**CONFIGS["sd3"])
  params = ae.random_params(config, seed=3)
  directory = str(tmp_path / "vae")
  ae.save_diffusers(directory, config, params)
  loaded_config, loaded = ae.load_diffusers(directory)
  assert loaded_config == config
  flat, flat_loaded = (traverse_util.flatten_dict(p) for p in (params, loaded))
  assert flat.keys() == flat_loaded.keys()
  for key, value in flat.items():
    assert flat_loaded[key].dtype == np.float32
    np.testing.assert_array_equal(flat_loaded[key], value, err_msg=str(key))

  model = diffusers.AutoencoderKL.from_pretrained(directory).eval()
  assert model.config.shift_factor == pytest.approx(config.shift_factor)
  assert not model.config.use_quant_conv
  images, latents = _inputs(config, 2, seed=1)
  for a, b in zip(
    _jax_outputs(config, params, images, latents),
    _torch_outputs(model, images, latents),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

  # Nothing on disk is overwritten.
  other = ae.random_params(config, seed=4)
  kernel = ("decoder", "conv_out", "kernel")
  assert not np.array_equal(traverse_util.flatten_dict(other)[kernel], flat[kernel])
  before = open(os.path.join(directory, ae.WEIGHTS_FILE), "rb").read()
  with pytest.raises(ConfigError, match="already exists"):
    ae.save_diffusers(directory, config, other)
  assert open(os.path.join(directory, ae.WEIGHTS_FILE), "rb").read() == before


def test_reads_legacy_attention_names(saved, tmp_path):
  _, directory = saved["sd"]
  _, params = ae.load_diffusers(directory)
  legacy = str(tmp_path / "legacy")
  shutil.copytree(directory, legacy)
  path = os.path.join(legacy, ae.WEIGHTS_FILE)
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  tensors = {}
  for key, value in load_file(path).items():
    for new, old in renames.items():
      if f".{new}.weight" in key:
        value = value[:, :, None, None]  # The oldest checkpoints stored them as 1x1 convs.
      key = key.replace(f".{new}.", f".{old}.")
    tensors[key] = value
  assert any(".proj_attn." in k for k in tensors)
  save_file(tensors, path)
  _, loaded = ae.load_diffusers(legacy)
  for key, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(loaded)[key], value)


def _edit_weights(source: str, target: str, edit) -> None:
  shutil.copytree(source, target)
  path = os.path.join(target, ae.WEIGHTS_FILE)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def _edit_config(source: str, target: str, **changes) -> None:
  shutil.copytree(source, target)
  path = os.path.join(target, ae.CONFIG_FILE)
  with open(path) as f:
    hf = json.load(f)
  hf.update(changes)
  with open(path, "w") as f:
    json.dump(hf, f)


def test_bad_directories_are_named(saved, tmp_path):
  _, good = saved["sd"]
  with pytest.raises(ConfigError, match="is not a directory"):
    ae.load_diffusers(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match=r"empty/config\.json' does not exist"):
    ae.load_diffusers(str(tmp_path / "empty"))

  _edit_config(good, tmp_path / "unet", _class_name="UNet2DConditionModel")
  with pytest.raises(ConfigError, match=r"unet/config\.json' describes a 'UNet2DConditionModel'"):
    ae.load_diffusers(str(tmp_path / "unet"))
  _edit_config(
    good, tmp_path / "attn", down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
  )
  with pytest.raises(ConfigError, match=r"config\.json': down_block_types="):
    ae.load_diffusers(str(tmp_path / "attn"))
  _edit_config(good, tmp_path / "stats", latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
  with pytest.raises(ConfigError, match="latents_mean"):
    ae.load_diffusers(str(tmp_path / "stats"))

  shutil.copytree(good, tmp_path / "no_weights")
  os.remove(tmp_path / "no_weights" / ae.WEIGHTS_FILE)
  with pytest.raises(ConfigError, match=r"no_weights/diffusion_pytorch_model\.safetensors"):
    ae.load_diffusers(str(tmp_path / "no_weights"))

  missing = "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"
  _edit_weights(good, tmp_path / "missing", lambda t: t.pop(missing))
  with pytest.raises(ConfigError, match=f"missing/{ae.WEIGHTS_FILE}' has no tensor '{missing}'"):
    ae.load_diffusers(str(tmp_path / "missing"))

  def truncate(t):
    t["encoder.conv_in.weight"] = np.ascontiguousarray(t["encoder.conv_in.weight"][:, :, :, :2])

  _edit_weights(good, tmp_path / "shape", truncate)
  with pytest.raises(
    ConfigError, match=r"'encoder.conv_in.weight' has shape \(32, 3, 3, 2\).*needs \(32, 3, 3, 3\)"
  ):
    ae.load_diffusers(str(tmp_path / "shape"))

  _edit_weights(good, tmp_path / "extra", lambda t: t.update(extra=np.zeros(3, np.float32)))
  with pytest.raises(ConfigError, match=r"holds 1 tensors .*'extra'"):
    ae.load_diffusers(str(tmp_path / "extra"))


@pytest.mark.sharding
def test_params_carry_logical_axes():
  boxed = ae.boxed_param_shapes(AutoencoderConfig(**CONFIGS["sd"]))
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
  kernels = {k: tuple(s) for k, s in specs.items() if k[-1] == "kernel"}
  assert specs and all(s is not None for s in specs.values())
  assert kernels[("encoder", "conv_in", "kernel")] == (None, None, axes.CONV_IN, axes.CONV_OUT)
  assert kernels[("encoder", "mid", "attention", "query", "kernel")] == (
    axes.CONV_IN,
    axes.CONV_OUT,
  )
  # Axes without rules are replicated; with a rule they are split.
  mesh = parallel.make_mesh(_mesh_config((1, 1, 8)))
  for rules, split in (((), False), (((axes.CONV_OUT, "tensor"),), True)):
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    spec = shardings["encoder"]["conv_in"]["kernel"].spec
    assert (spec[-1] == "tensor") == split, (rules, spec)


def _mesh_config(sizes):
  c = base_config()
  c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = sizes
  return c


@pytest.mark.sharding
@pytest.mark.parametrize("sizes", [(8, 1, 1), (1, 2, 4)])
def test_wrapper_on_a_mesh_matches_the_module(saved, sizes):
  config, params = ae.load_diffusers(saved["sd3"][1])
  assert config.shift_factor and config.scaling_factor != 1.0
  mesh = parallel.make_mesh(_mesh_config(sizes))
  vae = VAE.from_params(config, params, mesh)
  images, latents = _inputs(config, 5, seed=2)  # Padded to 8 (data x fsdp = 8) or 6 (2).
  mean, logvar, decoded = _jax_outputs(config, params, images, latents)

  got_mean, got_std = vae.encode(images)
  assert got_mean.shape == got_std.shape == mean.shape and got_mean.dtype == np.float32
  s, shift = config.scaling_factor, config.shift_factor
  close = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_mean, (mean - shift) * s, **close)
  np.testing.assert_allclose(got_std, np.exp(0.5 * logvar) * s, **close)
  np.testing.assert_allclose(vae.decode((latents - shift) * s), decoded, **close)
  # Decoding the encoded mean is the module's reconstruction.
  reconstruction = _jitted(config)[1](params, mean)
  np.testing.assert_allclose(vae.decode(got_mean), reconstruction, rtol=0, atol=1e-4)

  with pytest.raises(ConfigError, match=r"\[N, H, W, 3\].*multiples of 4; got \(5, 16, 16, 4\)"):
    vae.encode(np.zeros((5, 16, 16, 4), np.float32))
  with pytest.raises(ConfigError, match=r"\[N, h, w, 16\]"):
    vae.decode(np.zeros((5, 4, 4, 4), np.float32))


def test_wrapper_in_bfloat16_is_close_to_float32(saved):
  config, params = ae.load_diffusers(saved["sd"][1])
  mesh = parallel.make_mesh(_mesh_config((-1, 1, 1)))
  images, _ = _inputs(config, 8, seed=4)
  f32, bf16 = (VAE.from_params(config, params, mesh, dtype) for dtype in ("float32", "bfloat16"))
  mean32, _ = f32.encode(images)
  mean16, _ = bf16.encode(images)
  scale = np.abs(mean32).max()
  assert 0 < np.abs(mean16 - mean32).max() < 0.05 * scale
  with pytest.raises(ConfigError, match="vae.dtype='float16'"):
    VAE.from_params(config, params, mesh, "float16")
  wrong = dataclasses.replace(config, latent_channels=8)
  with pytest.raises(ConfigError, match=r"decoder/conv_in/kernel has shape \(3, 3, 4, 64\)"):
    VAE.from_params(wrong, params, mesh)
