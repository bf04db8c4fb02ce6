"""The frozen autoencoder between pixels and the diffusion model's latents, run over a mesh.

    vae = VAE.load("path/to/sd-vae-ft-ema", mesh)
    mean, std = vae.encode(images)  # model-latent units: (mean - shift) * scale, std * scale
    images = vae.decode(latents)    # from model-latent units back to pixels in about [-1, 1]

The batch is split over the mesh's data axes and the params are replicated. Every process passes
the same global batch and gets the whole result back.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dit_jax import parallel
from dit_jax.errors import ConfigError, check_choice
from dit_jax.models import autoencoder
from dit_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL

DTYPES = ("float32", "bfloat16")


class VAE:
  """An `AutoencoderKL` with its params on `mesh`, jitted once for encoding and decoding.

  Attributes:
    config: the architecture and its latent scaling.
    mesh: the device mesh; the batch is split over its data axes (data x fsdp).
    dtype: compute dtype, "float32" or "bfloat16".
  """

  def __init__(self, config: AutoencoderConfig, params, mesh: Mesh, dtype: str = "float32"):
    check_choice(dtype, DTYPES, "vae.dtype")
    autoencoder.check_params(config, params)
    self.config, self.mesh, self.dtype = config, mesh, dtype
    module = AutoencoderKL(config, dtype)
    replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    self._params = jax.tree.map(
      lambda a: parallel.from_host(np.asarray(a, np.float32), replicated), params
    )
    scale, shift = config.scaling_factor, config.shift_factor

    def encode(params, images):
      mean, logvar = module.apply({"params": params}, images, method=AutoencoderKL.encode)
      return (mean - shift) * scale, jnp.exp(0.5 * logvar) * scale

    def decode(params, latents):
      return module.apply({"params": params}, latents / scale + shift, method=AutoencoderKL.decode)

    self._encode = jax.jit(encode, in_shardings=(replicated, batch), out_shardings=(batch, batch))
    self._decode = jax.jit(decode, in_shardings=(replicated, batch), out_shardings=batch)

  @classmethod
  def load(cls, path: str, mesh: Mesh, dtype: str = "float32") -> "VAE":
    """The autoencoder of a diffusers AutoencoderKL directory (config.json + safetensors)."""
    config, params = autoencoder.load_diffusers(path)
    return cls(config, params, mesh, dtype)

  @classmethod
  def from_params(
    cls, config: AutoencoderConfig, params, mesh: Mesh, dtype: str = "float32"
  ) -> "VAE":
    """The autoencoder with `params` (e.g. `autoencoder.random_params(config)`)."""
    return cls(config, params, mesh, dtype)

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode_sharded(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`encode` on a global array already split by `parallel.batch_sharding(mesh)`; the batch
    must be a multiple of the data-parallel size. Returns sharded (mean, std) arrays."""
    return self._encode(self._params, images)

  def decode_sharded(self, latents: jax.Array) -> jax.Array:
    """`decode` on a global array already split by `parallel.batch_sharding(mesh)`."""
    return self._decode(self._params, latents)

  def _run(self, fn, x: np.ndarray):
    n = x.shape[0]
    dp = parallel.data_parallel_size(self.mesh)
    padded = -(-n // dp) * dp
    x = np.asarray(x, np.float32)
    if padded != n:
      x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), np.float32)])
    out = fn(parallel.from_host(x, parallel.batch_sharding(self.mesh)))
    out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a, np.float32)[:n], out)

  def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [N, H, W, Cin] in [-1, 1] (H, W multiples of the downsample factor), the
    same global batch on every process -> (mean, std) float32 [N, H/f, W/f, latent] on every
    process, in model-latent units: (mean - shift_factor) * scaling_factor and
    std * scaling_factor."""
    f, c = self.config.downsample_factor, self.config.in_channels
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != c or shape[1] % f or shape[2] % f or not shape[0]:
      raise ConfigError(
        f"The autoencoder encodes images of shape [N, H, W, {c}] with N >= 1 and H, W multiples "
        f"of {f}; got {shape}."
      )
    return self._run(self.encode_sharded, images)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Latents [N, h, w, latent] in model-latent units (as the diffusion model sees them) ->
    images float32 [N, h*f, w*f, Cout] in about [-1, 1] (not clipped) on every process."""
    c = self.config.latent_channels
    shape = np.shape(latents)
    if len(shape) != 4 or shape[-1] != c or not shape[0]:
      raise ConfigError(
        f"The autoencoder decodes latents of shape [N, h, w, {c}] with N >= 1; got {shape}."
      )
    return self._run(self.decode_sharded, latents)
