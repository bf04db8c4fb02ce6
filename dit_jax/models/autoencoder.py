"""The KL autoencoder of latent diffusion (Rombach et al., CVPR 2022), laid out as diffusers'
`AutoencoderKL`: Stable Diffusion's f8 VAE (4 latent channels) and SD3's (16 latent channels, no
quant convs) are both instances.

    config, params = load_diffusers("path/to/sd-vae-ft-ema")
    mean, logvar = AutoencoderKL(config).apply({"params": params}, images, method="encode")

Images are NHWC in [-1, 1]. `encode` gives the raw posterior (mean, logvar) and `decode` takes raw
latents; scaling to the diffusion model's latent units is `dit_jax.vae`'s job. `load_diffusers`
and `save_diffusers` read and write a diffusers directory (config.json +
diffusion_pytorch_model.safetensors) without PyTorch.
"""

import dataclasses
import json
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dit_jax import axes, storage
from dit_jax.errors import ConfigError
from dit_jax.models.layers import logical

Params = dict[str, Any]

CLASS_NAME = "AutoencoderKL"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
_EPS = 1e-6  # Every group norm of the network.
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this.


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture and latent normalization; field names and meanings are diffusers'."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels or self.layers_per_block < 1:
      raise ConfigError(
        "An AutoencoderKL needs at least one entry in block_out_channels and layers_per_block >= "
        f"1 (got {self.block_out_channels}, {self.layers_per_block})."
      )
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ConfigError(
        f"norm_num_groups={self.norm_num_groups} does not divide block_out_channels "
        f"{list(bad)}; every block width must be a multiple of the group count."
      )

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, hf: dict) -> "AutoencoderConfig":
    """The config of a diffusers AutoencoderKL `config.json` (missing fields take diffusers'
    defaults); options this module does not implement raise a ConfigError naming the field."""
    channels = tuple(int(c) for c in hf.get("block_out_channels", (64,)))
    for field, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
      types = list(hf.get(field, (block,)))
      if types != [block] * len(channels):
        raise ConfigError(
          f"{field}={types} is not supported; dit_jax's AutoencoderKL has one {block} per entry "
          f"of block_out_channels ({len(channels)})."
        )
    act = hf.get("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise ConfigError(f"act_fn={act!r} is not supported; dit_jax's AutoencoderKL uses 'silu'.")
    for field in ("latents_mean", "latents_std"):
      if hf.get(field) is not None:
        raise ConfigError(
          f"{field} is set, but per-channel latent statistics are not supported; dit_jax scales "
          "latents by scaling_factor and shift_factor only."
        )
    shift = hf.get("shift_factor")
    return cls(
      in_channels=int(hf.get("in_channels", 3)),
      out_channels=int(hf.get("out_channels", 3)),
      latent_channels=int(hf.get("latent_channels", 4)),
      block_out_channels=channels,
      layers_per_block=int(hf.get("layers_per_block", 1)),
      norm_num_groups=int(hf.get("norm_num_groups", 32)),
      scaling_factor=float(hf.get("scaling_factor", 0.18215)),
      shift_factor=0.0 if shift is None else float(shift),
      use_quant_conv=bool(hf.get("use_quant_conv", True)),
      use_post_quant_conv=bool(hf.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(hf.get("mid_block_add_attention", True)),
    )

  def to_diffusers(self) -> dict:
    """The diffusers `config.json` dict of this architecture."""
    n = len(self.block_out_channels)
    return {
      "_class_name": CLASS_NAME,
      "in_channels": self.in_channels,
      "out_channels": self.out_channels,
      "down_block_types": [DOWN_BLOCK] * n,
      "up_block_types": [UP_BLOCK] * n,
      "block_out_channels": list(self.block_out_channels),
      "layers_per_block": self.layers_per_block,
      "act_fn": "silu",
      "latent_channels": self.latent_channels,
      "norm_num_groups": self.norm_num_groups,
      "scaling_factor": self.scaling_factor,
      "shift_factor": self.shift_factor or None,  # None, as Stable Diffusion's own config has.
      "use_quant_conv": self.use_quant_conv,
      "use_post_quant_conv": self.use_post_quant_conv,
      "mid_block_add_attention": self.mid_block_add_attention,
    }


# The released architectures, for random-weight stand-ins (benchmarks, tests); no weights.
PRESETS = {
  "sd": AutoencoderConfig(),  # Stable Diffusion 1 and 2 (sd-vae-ft-ema / sd-vae-ft-mse).
  "sd3": AutoencoderConfig(
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
  ),
}


def _conv(
  features: int, kernel: int, dtype: Any, *, stride: int = 1, padding=None, name: str | None = None
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding=((pad, pad), (pad, pad)) if padding is None else padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=logical(nn.initializers.lecun_normal(), (None, None, axes.CONV_IN, axes.CONV_OUT)),
    bias_init=logical(nn.initializers.zeros_init(), (axes.CONV_OUT,)),
    name=name,
  )


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=logical(nn.initializers.lecun_normal(), (axes.CONV_IN, axes.CONV_OUT)),
    bias_init=logical(nn.initializers.zeros_init(), (axes.CONV_OUT,)),
    name=name,
  )


class GroupNorm(nn.Module):
  """Group norm over (H, W, channels of a group) of NHWC input, statistics in float32."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", logical(nn.initializers.ones_init(), (axes.CONV_OUT,)), (c,))
    bias = self.param("bias", logical(nn.initializers.zeros_init(), (axes.CONV_OUT,)), (c,))
    g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)  # [B,H,W,G,c/G]
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + _EPS)
    return (g.reshape(x.shape) * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
  """norm-silu-conv twice plus the input (through a 1x1 conv where the width changes)."""

  features: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(GroupNorm(self.groups, self.dtype, name="norm1")(x))
    h = _conv(self.features, 3, self.dtype, name="conv1")(h)
    h = nn.silu(GroupNorm(self.groups, self.dtype, name="norm2")(h))
    h = _conv(self.features, 3, self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, name="conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """One head over all channels, every pixel attending to every pixel, with a residual."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, self.dtype, name="norm")(x).reshape(b, h * w, 1, c)  # [B, L, 1, C]
    q, k, v = (_dense(c, self.dtype, name)(y) for name in ("query", "key", "value"))
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)  # [B, L, C]
    out = _dense(c, self.dtype, "out")(out)
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnet_0")(x)
    if self.attention:
      x = AttentionBlock(self.groups, self.dtype, name="attention")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnet_1")(x)


class DownBlock(nn.Module):
  """Resnet blocks, then (except at the last level) a stride-2 conv that halves H and W."""

  features: int
  layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnet_{i}")(x)
    if self.downsample:
      # Padding only after each edge, as the released checkpoints were trained with.
      pad = ((0, 1), (0, 1))
      x = _conv(self.features, 3, self.dtype, stride=2, padding=pad, name="downsample")(x)
    return x


class UpBlock(nn.Module):
  """Resnet blocks, then (except at the last level) nearest 2x upsampling and a conv."""

  features: int
  layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnet_{i}")(x)
    if self.upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
      x = _conv(self.features, 3, self.dtype, name="upsample")(x)
    return x


class Encoder(nn.Module):
  """Image [B, H, W, Cin] -> posterior parameters [B, H/f, W/f, 2 * latent] (before quant_conv)."""

  config: AutoencoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dt = self.config, self.dtype
    widths = cfg.block_out_channels
    groups = cfg.norm_num_groups
    h = _conv(widths[0], 3, dt, name="conv_in")(x)
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      h = DownBlock(width, cfg.layers_per_block, groups, not last, dt, name=f"down_{i}")(h)
    h = MidBlock(groups, cfg.mid_block_add_attention, dt, name="mid")(h)
    h = nn.silu(GroupNorm(groups, dt, name="norm_out")(h))
    return _conv(2 * cfg.latent_channels, 3, dt, name="conv_out")(h)


class Decoder(nn.Module):
  """Latents [B, h, w, latent] (after post_quant_conv) -> image [B, h*f, w*f, Cout]."""

  config: AutoencoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, dt = self.config, self.dtype
    widths = cfg.block_out_channels[::-1]
    groups = cfg.norm_num_groups
    h = _conv(widths[0], 3, dt, name="conv_in")(z)
    h = MidBlock(groups, cfg.mid_block_add_attention, dt, name="mid")(h)
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      h = UpBlock(width, cfg.layers_per_block + 1, groups, not last, dt, name=f"up_{i}")(h)
    h = nn.silu(GroupNorm(groups, dt, name="norm_out")(h))
    return _conv(cfg.out_channels, 3, dt, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """Encoder and decoder with the optional 1x1 convs between them and the latents.

  Attributes:
    config: the architecture.
    dtype: compute dtype, "float32" or "bfloat16"; params are float32 and the outputs of
      `encode` and `decode` are float32 either way.
  """

  config: AutoencoderConfig
  dtype: Any = "float32"

  def setup(self):
    cfg, dt = self.config, jnp.dtype(self.dtype)
    self.encoder = Encoder(cfg, dt)
    self.decoder = Decoder(cfg, dt)
    self.quant_conv = _conv(2 * cfg.latent_channels, 1, dt) if cfg.use_quant_conv else None
    self.post_quant_conv = _conv(cfg.latent_channels, 1, dt) if cfg.use_post_quant_conv else None

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, Cin] in [-1, 1] -> raw posterior (mean, logvar), each [B, H/f, W/f, c]."""
    assert x.ndim == 4 and x.shape[-1] == self.config.in_channels, x.shape
    h = self.encoder(x.astype(jnp.dtype(self.dtype)))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw latents [B, h, w, c] -> images [B, h*f, w*f, Cout] (about [-1, 1], not clipped)."""
    assert z.ndim == 4 and z.shape[-1] == self.config.latent_channels, z.shape
    z = z.astype(jnp.dtype(self.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x)[0])


def boxed_param_shapes(config: AutoencoderConfig) -> Params:
  """Abstract params (ShapeDtypeStructs) still boxed with their logical axes, for shardings."""
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


def param_shapes(config: AutoencoderConfig) -> Params:
  """Abstract params (ShapeDtypeStructs) of `config`."""
  return nn.unbox(boxed_param_shapes(config))


def random_params(config: AutoencoderConfig, seed: int = 0) -> Params:
  """Random params (float32 numpy) of `config`, e.g. for a random-weight VAE, at the scales of
  the module's initializers: kernels normal with variance 1 / fan-in, zero biases, unit norm
  scales. Drawn with numpy from the module's param shapes: compiling `init` would spend seconds
  on its random number generators alone."""
  rng = np.random.default_rng(seed)

  def draw(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)

  flat = traverse_util.flatten_dict(param_shapes(config))
  return traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})


# Flax module names -> diffusers names. Indexed names (down_0, up_1, resnet_0) are handled apart.
_RENAMES = {
  "mid": "mid_block",
  "attention": "attentions.0",
  "norm_out": "conv_norm_out",
  "downsample": "downsamplers.0.conv",
  "upsample": "upsamplers.0.conv",
  "norm": "group_norm",
  "query": "to_q",
  "key": "to_k",
  "value": "to_v",
  "out": "to_out.0",
  "kernel": "weight",
  "scale": "weight",
}
_INDEXED = {"down": "down_blocks", "up": "up_blocks", "resnet": "resnets"}
# Attention names of the checkpoints saved before diffusers 0.14 (e.g. the sd-vae-ft-* VAEs).
_LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _diffusers_name(path: tuple[str, ...]) -> str:
  parts = []
  for part in path:
    m = re.fullmatch(r"(down|up|resnet)_(\d+)", part)
    parts.append(f"{_INDEXED[m[1]]}.{m[2]}" if m else _RENAMES.get(part, part))
  return ".".join(parts)


def _legacy_name(name: str) -> str | None:
  for new, old in _LEGACY.items():
    if new in name:
      return name.replace(new, old)
  return None


def _to_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  """A flax param in torch layout: conv [kh, kw, I, O] -> [O, I, kh, kw], dense [I, O] -> [O, I]."""
  if path[-1] == "kernel":
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
  return a


def _from_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  return a


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch(path, np.empty(shape, np.bool_)).shape


def _read_config(directory: str) -> AutoencoderConfig:
  if not storage.isdir(directory):
    raise ConfigError(
      f"{directory!r} is not a directory; pass a diffusers AutoencoderKL directory "
      f"({CONFIG_FILE} + {WEIGHTS_FILE})."
    )
  path = storage.join(directory, CONFIG_FILE)
  if not storage.isfile(path):
    raise ConfigError(
      f"{path!r} does not exist; a diffusers AutoencoderKL directory holds {CONFIG_FILE} and "
      f"{WEIGHTS_FILE} (e.g. <pipeline>/vae)."
    )
  try:
    hf = storage.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path!r} cannot be read as JSON ({e}); is the download complete?") from None
  if not isinstance(hf, dict) or hf.get("_class_name") != CLASS_NAME:
    found = hf.get("_class_name") if isinstance(hf, dict) else None
    what = f"describes a {found!r}" if found else "names no _class_name"
    raise ConfigError(
      f"{path!r} {what}, not an {CLASS_NAME}; pass the autoencoder's directory "
      "(e.g. <pipeline>/vae)."
    )
  try:
    return AutoencoderConfig.from_diffusers(hf)
  except ConfigError as e:
    raise ConfigError(f"{path!r}: {e}") from None


def _weights_file(directory: str) -> str:
  path = storage.join(directory, WEIGHTS_FILE)
  if storage.isfile(path):
    return path
  found = [n for n in storage.listdir(directory) if n.endswith(".safetensors")]
  if len(found) == 1:  # A variant such as diffusion_pytorch_model.fp16.safetensors.
    return storage.join(directory, found[0])
  raise ConfigError(
    f"{path!r} does not exist"
    + (f" and {len(found)} other *.safetensors files are there" if found else "")
    + "; dit_jax reads an AutoencoderKL's weights from that file (diffusers writes it with "
    "save_pretrained(..., safe_serialization=True))."
  )


def load_diffusers(directory: str) -> tuple[AutoencoderConfig, Params]:
  """Reads a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).

  Returns:
    (config, params): the architecture and its params (float32 numpy) for `AutoencoderKL`.
  """
  from safetensors import SafetensorError, safe_open

  config = _read_config(directory)
  path = _weights_file(directory)
  params = {}
  try:
    # The flax reader handles bfloat16 tensors, which numpy cannot hold.
    with storage.local_copy(path) as local, safe_open(local, framework="flax") as fh:
      unused = set(fh.keys())
      for fpath, leaf in traverse_util.flatten_dict(param_shapes(config)).items():
        name = _diffusers_name(fpath)
        legacy = _legacy_name(name)
        key = name if name in unused else legacy if legacy in unused else None
        if key is None:
          raise ConfigError(
            f"{path!r} has no tensor {name!r} that the AutoencoderKL of its {CONFIG_FILE} needs; "
            "the weights and the config do not match."
          )
        unused.remove(key)
        a = np.asarray(fh.get_tensor(key), np.float32)
        want = _torch_shape(fpath, leaf.shape)
        if key == legacy and a.shape == (*want, 1, 1):  # Old attention weights saved as 1x1 convs.
          a = a.reshape(want)
        if a.shape != want:
          raise ConfigError(
            f"{path!r}: tensor {key!r} has shape {a.shape} but the AutoencoderKL of its "
            f"{CONFIG_FILE} needs {want}; the weights and the config do not match."
          )
        params[fpath] = np.ascontiguousarray(_from_torch(fpath, a))
  except SafetensorError as e:
    raise ConfigError(f"{path!r} cannot be read as safetensors ({e}).") from None
  if unused:
    raise ConfigError(
      f"{path!r} holds {len(unused)} tensors the AutoencoderKL of its {CONFIG_FILE} does not "
      f"use (e.g. {sorted(unused)[:3]}); the weights and the config do not match."
    )
  return config, traverse_util.unflatten_dict(params)


def check_params(config: AutoencoderConfig, params: Params) -> None:
  """Raises a ConfigError unless `params` has exactly the names and shapes `config` needs."""
  want = traverse_util.flatten_dict(param_shapes(config))
  got = traverse_util.flatten_dict(nn.unbox(params))
  if want.keys() != got.keys():
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    raise ConfigError(
      f"The params do not match the AutoencoderConfig: missing {['/'.join(p) for p in missing]}, "
      f"unexpected {['/'.join(p) for p in extra]}."
    )
  for p, leaf in want.items():
    if tuple(np.shape(got[p])) != leaf.shape:
      raise ConfigError(
        f"The param {'/'.join(p)} has shape {tuple(np.shape(got[p]))} but the "
        f"AutoencoderConfig needs {leaf.shape}."
      )


def save_diffusers(
  directory: str, config: AutoencoderConfig, params: Params, *, overwrite: bool = False
) -> None:
  """Writes `params` as a diffusers AutoencoderKL directory that `load_diffusers` and diffusers'
  `AutoencoderKL.from_pretrained` read; existing files are kept unless `overwrite`."""
  from safetensors.numpy import save

  check_params(config, params)
  paths = {name: storage.join(directory, name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
  for path in paths.values():
    if storage.exists(path) and not overwrite:
      raise ConfigError(f"{path!r} already exists; pick a new directory for the autoencoder.")
  tensors = {
    _diffusers_name(p): np.ascontiguousarray(_to_torch(p, np.asarray(a, np.float32)))
    for p, a in traverse_util.flatten_dict(nn.unbox(params)).items()
  }
  # Each file appears whole or not at all; weights first, so a config always has its weights.
  storage.write_bytes(paths[WEIGHTS_FILE], save(tensors, metadata={"format": "pt"}))
  storage.write_json(paths[CONFIG_FILE], config.to_diffusers())
