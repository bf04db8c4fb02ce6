"""Building blocks shared by the diffusion transformers. Logical axes only, no mesh names."""

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import axes
from dit_jax.models.attention import dot_product_attention

Dtype = jnp.dtype
Init = Callable[..., jax.Array]

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()

# config.model.remat: what the backward pass keeps of each block's activations.
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def xavier_fused(parts: int) -> Init:
  """Xavier-uniform for one of `parts` equal projections that a reference implementation fuses
  into one [fan_in, parts * fan_out] matrix (DiT's qkv): drawn with the fused matrix's fans."""

  def init(rng: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    fan_in, fan_out = shape  # DenseGeneral passes the kernel flattened to 2D.
    limit = math.sqrt(6.0 / (fan_in + parts * fan_out))
    return jax.random.uniform(rng, shape, dtype, -limit, limit)

  return init


def logical(init: Init, names: Sequence[str | None]) -> Init:
  """Attaches logical axis names to a parameter initializer."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  return nn.with_logical_constraint(x, tuple(names))


class DenseGeneral(nn.Module):
  """x @ kernel (+ bias unless `use_bias=False`) over `axis`, with the kernel shaped
  [*contracted dims, *features] and named by `kernel_axes` (the bias by the output names), so
  that each dimension can be sharded.

  The initializer sees the flattened [fan_in, fan_out] matrix, as in a 2D dense layer.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  dtype: Dtype = jnp.float32
  kernel_init: Init = xavier
  bias_init: Init = zeros
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    fan = (math.prod(in_shape), math.prod(self.features))
    assert len(self.kernel_axes) == len(in_shape) + len(self.features), self.kernel_axes

    def kernel_init(rng, shape, dtype=jnp.float32):
      return self.kernel_init(rng, fan, dtype).reshape(shape)

    kernel = self.param(
      "kernel", logical(kernel_init, self.kernel_axes), in_shape + self.features, jnp.float32
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    y = jax.lax.dot_general(x, kernel, dims)
    if not self.use_bias:
      return y
    bias = self.param(
      "bias", logical(self.bias_init, self.kernel_axes[len(in_shape) :]), self.features, jnp.float32
    )
    # The bias is added in float32, so that its gradient, a sum over every token of the batch,
    # is accumulated in float32 whatever the compute dtype.
    return (y + bias).astype(self.dtype)


def dense(
  features: int | Sequence[int],
  kernel_axes: Sequence[str | None],
  dtype: Dtype,
  *,
  axis: int | Sequence[int] = -1,
  kernel_init: Init = xavier,
  bias_init: Init = zeros,
  use_bias: bool = True,
  name: str | None = None,
) -> DenseGeneral:
  """A dense layer whose kernel and bias carry logical axes (bias: the output axes)."""
  return DenseGeneral(
    features=(features,) if isinstance(features, int) else tuple(features),
    kernel_axes=tuple(kernel_axes),
    axis=(axis,) if isinstance(axis, int) else tuple(axis),
    dtype=dtype,
    kernel_init=kernel_init,
    bias_init=bias_init,
    use_bias=use_bias,
    name=name,
  )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x [B, L, D], shift/scale [B, D]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(affine: bool, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=1e-6,
    use_bias=affine,
    use_scale=affine,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=logical(nn.initializers.ones_init(), (axes.EMBED,)),
    bias_init=logical(zeros, (axes.EMBED,)),
    name=name,
  )


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """Sin-cos features of `positions` [N] -> [N, dim] (sin half first)."""
  assert dim % 2 == 0, dim
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]  # [N, dim/2]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, spacing: float = 1.0) -> np.ndarray:
  """Fixed 2D position embedding [grid_h * grid_w, dim], tokens in row-major order.

  The first half of the features encodes the column, the second half the row, which is the
  layout of the released DiT and SD3 checkpoints. Token (i, j) sits at position
  (i * spacing, j * spacing).
  """
  assert dim % 4 == 0, f"width {dim} must be divisible by 4 for the 2D sin-cos embedding"
  rows, cols = np.meshgrid(np.arange(grid_h) * spacing, np.arange(grid_w) * spacing, indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of (possibly fractional) timesteps t [B] -> [B, dim], cos half first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t followed by a two-layer MLP."""

  width: int
  dtype: Dtype = jnp.float32
  frequency_dim: int = 256

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    h = timestep_features(t, self.frequency_dim).astype(self.dtype)
    h = dense(self.width, (axes.FREQ, axes.EMBED), self.dtype, kernel_init=init, name="mlp_in")(h)
    h = nn.silu(h)
    return dense(self.width, (axes.MLP, axes.EMBED), self.dtype, kernel_init=init, name="mlp_out")(
      h
    )  # [B, D]


class LabelEmbedder(nn.Module):
  """Class embedding table with one extra row, the null class used for guidance (labels are
  dropped to it in training by `dit_jax.conditioning`)."""

  num_classes: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    table = self.param(
      "embedding",
      logical(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
      (self.num_classes + 1, self.width),
      jnp.float32,
    )
    return jnp.take(table, labels, axis=0).astype(self.dtype)  # [B, D]


class Attention(nn.Module):
  """Multi-head attention; self-attention when `context` is None.

  With `fused_qkv_init` (the default) the query, key and value kernels are drawn as the thirds of
  one xavier-uniform [D, 3D] matrix, as the released DiT initializes its fused qkv layer (std
  sqrt(2 / 4D), not the sqrt(2 / 2D) of three separate [D, D] layers).

  With `time` [B, D] given, the attention is DiffiT's time-dependent self-attention (TMSA,
  Hatamizadeh et al., ECCV 2024): q = x W_qs + t W_qt and v = x W_vs + t W_vt, where the token
  projections are the layers above and `time_qv` is one bias-free dense layer t [B, D] ->
  [B, 2, H, Dh] (the paper's equations have no time bias; the token projections carry one).
  DiffiT also adds t W_kt to the keys. That term is the same for every key of a sample, so it adds
  q_i . (t W_kt) to every logit of query i, which the softmax cancels: it cannot change the
  output and its gradient is zero up to rounding, so it is left out (D^2 fewer parameters per
  block). The query term is what makes the attention pattern depend on t; the value term adds a
  time-dependent vector to each head's output. `time_qv` is zero-initialized, so a TMSA model
  starts as the plain one (same parameters, same outputs) and learns how far attention should
  depend on the noise level; DiffiT's release draws it xavier-uniform instead. The time terms are
  added before the kernel (`dit_jax.models.attention`), so every kernel runs unchanged.
  """

  heads: int
  dtype: Dtype = jnp.float32
  fused_qkv_init: bool = True
  attention: str = "xla"  # The kernel (`dit_jax.models.attention`).

  @nn.compact
  def __call__(
    self, x: jax.Array, context: jax.Array | None = None, time: jax.Array | None = None
  ) -> jax.Array:
    width = x.shape[-1]
    assert width % self.heads == 0, f"width {width} not divisible by {self.heads} heads"
    head_dim = width // self.heads
    assert time is None or context is None, "TMSA is self-attention: no context with time"
    context = x if context is None else context

    # DenseGeneral hands initializers the kernel flattened to 2D, so xavier sees the true fans.
    qkv_init = xavier_fused(3) if self.fused_qkv_init else xavier

    def project(name: str, src: jax.Array) -> jax.Array:
      kernel_axes = (axes.EMBED, axes.HEADS, axes.KV)
      return dense(
        (self.heads, head_dim), kernel_axes, self.dtype, kernel_init=qkv_init, name=name
      )(src)  # [B, L, H, Dh]

    q, k, v = project("query", x), project("key", context), project("value", context)
    if time is not None:
      assert time.shape == (x.shape[0], width), (time.shape, x.shape)
      tqv = dense(
        (2, self.heads, head_dim),
        (axes.EMBED, None, axes.HEADS, axes.KV),
        self.dtype,
        kernel_init=zeros,
        use_bias=False,
        name="time_qv",
      )(time)  # [B, 2, H, Dh]
      tqv = constrain(tqv, (axes.BATCH, None, axes.HEADS, axes.KV))
      q, v = q + tqv[:, None, 0], v + tqv[:, None, 1]  # [B, L, H, Dh]
    q = constrain(q, (axes.BATCH, axes.SEQ, axes.HEADS, axes.KV))
    out = dot_product_attention(q, k, v, self.attention)  # [B, L, H, Dh]
    out = dense(width, (axes.HEADS, axes.KV, axes.EMBED), self.dtype, axis=(-2, -1), name="out")(
      out
    )
    return constrain(out, (axes.BATCH, axes.SEQ, axes.EMBED))  # [B, L, D]


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(self.hidden, (axes.EMBED, axes.MLP), self.dtype, name="fc1")(x)
    h = constrain(nn.gelu(h, approximate=True), (axes.BATCH, axes.SEQ, axes.MLP))
    return dense(width, (axes.MLP, axes.EMBED), self.dtype, name="fc2")(h)


class RMSNorm(nn.Module):
  """Root-mean-square normalization over the last axis with a learned scale (computed in f32)."""

  names: tuple[str | None, ...] = (axes.KV,)
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", logical(nn.initializers.ones_init(), self.names), (x.shape[-1],), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(x.dtype)


# The stem and the stack the DiT family shares (DiT, MMDiT, the noise-aware classifier). Called
# inside a model's compact __call__, so the submodules they make are the model's own, under the
# same names ("patch_embed", the caller's block name) as when each model wrote them out.


def patch_embed(x: jax.Array, patch: int, width: int, dtype: Dtype) -> jax.Array:
  """Images [B, H, W, C] -> patch tokens [B, (H/p)(W/p), width], row-major over the patch grid,
  each patch flattened (p, p, C) and projected by the dense layer "patch_embed"."""
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  tokens = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  tokens = tokens.reshape(b, gh * gw, patch * patch * c).astype(dtype)  # [B, L, p*p*C]
  return dense(width, (axes.PATCH, axes.EMBED), dtype, name="patch_embed")(tokens)  # [B, L, D]


def unpatchify(tokens: jax.Array, grid_h: int, grid_w: int, patch: int) -> jax.Array:
  """Per-patch outputs [B, gh*gw, p*p*C] -> images [B, gh*p, gw*p, C] in float32 (the inverse
  of `patch_embed`'s flattening)."""
  b, _, d = tokens.shape
  c = d // (patch * patch)
  out = tokens.reshape(b, grid_h, grid_w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, grid_h * patch, grid_w * patch, c).astype(jnp.float32)  # [B, H, W, C]


def rematted(block: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block` rematerialized by `REMAT_POLICIES[remat]` (config.model.remat), or as it is if
  "none"."""
  if remat == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)


def scanned(block: type[nn.Module], depth: int, unroll: int, remat: str, broadcast: int = 1):
  """`block` stacked `depth` times with `nn.scan` (parameters with a leading "layers" axis, each
  layer initialized apart), `rematted` by `remat`, `unroll` layers per scan iteration; the carry
  is the first input, the next `broadcast` inputs are the same for every layer. Construct the
  result with the block's fields."""
  return nn.scan(
    rematted(block, remat),
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast,) * broadcast,
    length=depth,
    unroll=min(max(unroll, 1), depth),
    metadata_params={nn.PARTITION_NAME: axes.LAYERS},
  )
