"""DiT (Peebles & Xie, ICCV 2023) with the four conditioning designs of the paper's Figure 3.

- `adaln_zero`: adaptive layer norm whose shift, scale and residual gates are regressed from
  t + y and zero-initialized, so every block starts as the identity (the paper's choice).
- `adaln`: shift and scale only, regular initialization.
- `cross_attention`: t and y embeddings form a two-token sequence every block cross-attends to.
- `in_context`: t and y embeddings are two extra tokens, removed after the last block.

`attention_conditioning="tmsa"` makes every block's self-attention time-dependent as in DiffiT
(Hatamizadeh et al., ECCV 2024): the time embedding t_emb (not t + y: the paper's time token, so
that attention changes with the noise level while the label acts through the conditioning above)
is projected into q and v and added to the token projections (`layers.Attention`; DiffiT's key
term is left out because the softmax cancels it). It works with all four conditioning designs and
adds 2 D^2 parameters per block. Not reproduced: DiffiT's relative position bias, its U-shaped
image-space network, and its latent model's plain (not adaLN) norms; here TMSA comes on top of
the chosen conditioning. DiffiT's released latent model (github.com/NVlabs/DiffiT) also feeds
t + y, not t, to its time projection, and is sized like DiT-XL/2 (width 1152, depth 28, 16
heads, patch 2: `variant="XL/2"`), so no separate variant table is added.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax import axes
from dit_jax.models import layers
from dit_jax.models.layers import constrain, dense


class DiTBlock(nn.Module):
  """One transformer block; `cond` is [B, D] (adaLN variants) or [B, 2, D] (cross-attention);
  `t_emb` [B, D], the time embedding, is given only with `attention_conditioning="tmsa"`."""

  width: int
  heads: int
  mlp_ratio: float
  conditioning: str
  dtype: Any = jnp.float32
  attention: str = "xla"
  attention_conditioning: str = "none"

  @nn.compact
  def __call__(
    self, x: jax.Array, cond: jax.Array, t_emb: jax.Array | None = None
  ) -> tuple[jax.Array, None]:
    assert (t_emb is not None) == (self.attention_conditioning == "tmsa"), "t_emb is for tmsa"
    mlp = layers.Mlp(int(self.width * self.mlp_ratio), self.dtype, name="mlp")
    attn = layers.Attention(self.heads, self.dtype, attention=self.attention, name="attn")
    if self.conditioning in ("adaln_zero", "adaln"):
      gated = self.conditioning == "adaln_zero"
      n_mod = 6 if gated else 4
      init = layers.zeros if gated else layers.xavier
      mod = dense(
        (n_mod, self.width),
        (axes.EMBED, None, axes.MLP),
        self.dtype,
        kernel_init=init,
        name="modulation",
      )(nn.silu(cond))  # [B, n_mod, D]
      mod = [mod[:, i] for i in range(n_mod)]
      if gated:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
      else:
        shift_a, scale_a, shift_m, scale_m = mod
        gate_a = gate_m = jnp.ones_like(shift_a)
      norm1 = layers.layer_norm(False, self.dtype, name="norm1")
      norm2 = layers.layer_norm(False, self.dtype, name="norm2")
      x = x + gate_a[:, None] * attn(layers.modulate(norm1(x), shift_a, scale_a), time=t_emb)
      x = x + gate_m[:, None] * mlp(layers.modulate(norm2(x), shift_m, scale_m))
    else:
      x = x + attn(layers.layer_norm(True, self.dtype, name="norm1")(x), time=t_emb)
      if self.conditioning == "cross_attention":
        cross = layers.Attention(
          self.heads, self.dtype, attention=self.attention, name="cross_attn"
        )
        x = x + cross(layers.layer_norm(True, self.dtype, name="norm_cross")(x), cond)
      x = x + mlp(layers.layer_norm(True, self.dtype, name="norm2")(x))
    return constrain(x, axes.TOKENS), None


class FinalLayer(nn.Module):
  """Norm (adaLN-modulated for the adaLN variants) and projection back to patches."""

  out_dim: int
  conditioning: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    zero = self.conditioning == "adaln_zero"
    if self.conditioning in ("adaln_zero", "adaln"):
      width = x.shape[-1]
      mod = dense(
        (2, width),
        (axes.EMBED, None, axes.MLP),
        self.dtype,
        kernel_init=layers.zeros if zero else layers.xavier,
        name="modulation",
      )(nn.silu(cond))  # [B, 2, D]
      x = layers.modulate(
        layers.layer_norm(False, self.dtype, name="norm")(x), mod[:, 0], mod[:, 1]
      )
    else:
      x = layers.layer_norm(True, self.dtype, name="norm")(x)
    return dense(
      self.out_dim,
      (axes.EMBED, axes.PATCH),
      self.dtype,
      kernel_init=layers.zeros if zero else layers.xavier,
      name="linear",
    )(x)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Static hyper-parameters of a DiT; built from the config by `dit_jax.models.build_model`."""

  input_size: int
  in_channels: int
  patch: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  conditioning: str = "adaln_zero"
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1
  attention: str = "xla"  # The attention kernel (`dit_jax.models.attention`).
  attention_conditioning: str = "none"  # "tmsa": DiffiT's time-dependent self-attention.

  @property
  def out_channels(self) -> int:
    return self.in_channels * (2 if self.learn_sigma else 1)


class DiT(nn.Module):
  """Class-conditional diffusion transformer over images [B, H, W, C] (pixels or latents).

  Precision: with `dtype="bfloat16"` the matmuls take bfloat16 operands, and what sets the
  result's precision stays float32 at little cost: the parameters; the residual stream (a block's
  update is small against it, and a bfloat16 sum keeps 8 significant bits, rounding away the
  update's lower part in every block); the bias additions, whose gradients are sums over the
  whole batch (`layers.DenseGeneral`); the norm statistics, the softmax and the timestep
  features; and the final layer (about 0.01% of XL/2's FLOPs), whose output is the prediction
  that the loss and the sampler read. The adaLN shift, scale and gate stay in the compute dtype:
  in float32 they would double the activations the backward pass keeps for them (4 GiB more for
  XL/2 at 64 images per v5p chip) for a barely measurable gain.
  """

  config: DiTConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    cond: dict[str, jax.Array],
    label_embedding_fn: Callable[[jax.Array], jax.Array] | None = None,
  ) -> jax.Array:
    """Returns the prediction [B, H, W, out_channels] for inputs x at model times t [B] and
    class labels cond["label"] [B] (the null class, num_classes, for unconditional).

    `label_embedding_fn`, if given, maps the class embeddings [B, D] before they condition the
    blocks: the hook through which a sampler perturbs the condition the model sees (CADS,
    `dit_jax.diffusion.guidance`) without a second way of feeding labels.
    """
    cfg = self.config
    labels = cond["label"]
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, c = x.shape
    p = cfg.patch
    assert (h, w, c) == (cfg.input_size, cfg.input_size, cfg.in_channels), (x.shape, cfg)
    assert t.shape == (b,) and labels.shape == (b,), (t.shape, labels.shape)
    gh, gw = h // p, w // p

    tokens = layers.patch_embed(x, p, cfg.width, dtype)  # [B, L, D]
    pos = layers.sincos_2d(cfg.width, gh, gw)  # [L, D], fixed
    # The residual stream stays float32 whatever the compute dtype (see `DiT`).
    tokens = constrain(tokens + jnp.asarray(pos, jnp.float32)[None], axes.TOKENS)  # [B, L, D]

    t_emb = layers.TimestepEmbedder(cfg.width, dtype, name="t_embedder")(t)  # [B, D]
    y_emb = layers.LabelEmbedder(cfg.num_classes, cfg.width, dtype, name="y_embedder")(labels)
    if label_embedding_fn is not None:
      y_emb = label_embedding_fn(y_emb)
    if cfg.conditioning in ("adaln_zero", "adaln"):
      cond = t_emb + y_emb  # [B, D]
    else:
      cond = jnp.stack([t_emb, y_emb], axis=1)  # [B, 2, D]
    n_extra = 0
    if cfg.conditioning == "in_context":
      n_extra = 2
      tokens = jnp.concatenate([cond, tokens], axis=1)  # [B, 2 + L, D]

    # Every block sees the same conditioning (and, for TMSA, the same time embedding).
    block_inputs = (cond, t_emb) if cfg.attention_conditioning == "tmsa" else (cond,)
    blocks = layers.scanned(DiTBlock, cfg.depth, cfg.scan_unroll, cfg.remat, len(block_inputs))(
      cfg.width,
      cfg.heads,
      cfg.mlp_ratio,
      cfg.conditioning,
      dtype,
      cfg.attention,
      cfg.attention_conditioning,
      name="blocks",
    )
    tokens, _ = blocks(tokens, *block_inputs)
    tokens = tokens[:, n_extra:]  # [B, L, D]

    final = FinalLayer(p * p * cfg.out_channels, cfg.conditioning, jnp.float32, name="final")
    return layers.unpatchify(final(tokens, cond), gh, gw, p)  # [B, H, W, out_C]
