"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al., 2024).

Image tokens and text tokens keep separate weights (modulation, attention projections, MLP) and
meet in one attention over the joined sequence. Every block is modulated (adaLN-Zero) by the
timestep embedding plus an embedding of the pooled text vector. The last block only lets the text
tokens be attended to: its text stream has no output projection and no MLP, as in the released
model. Image positions come from a fixed sin-cos table over a `pos_embed_max_size` grid, cropped
at the centre to the image's grid, so one model serves several resolutions.

Parameter names are part of the checkpoint format and of `dit_jax.models.convert` (diffusers
`SD3Transformer2DModel`); change them only together.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import axes
from dit_jax.models import layers
from dit_jax.models.attention import dot_product_attention
from dit_jax.models.dit import FinalLayer
from dit_jax.models.layers import constrain, dense

_HEADS_ACT = (axes.BATCH, axes.SEQ, axes.HEADS, axes.KV)
STREAMS = ("img", "txt")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Static hyper-parameters of an MMDiT; built by `dit_jax.models.build_model`."""

  input_size: int
  in_channels: int
  patch: int
  width: int
  depth: int
  heads: int
  context_dim: int  # Channels of the text token sequence (SD3: 4096).
  pooled_dim: int  # Channels of the pooled text vector (SD3: 2048).
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  pos_embed_max_size: int = 0  # Side of the position table in patches (0: the image's grid).
  pos_embed_base_size: int = 0  # Grid side the table's spacing is relative to (0: the same).
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1
  attention: str = "xla"  # The attention kernel (`dit_jax.models.attention`).

  @property
  def out_channels(self) -> int:
    return self.in_channels

  @property
  def grid(self) -> int:
    return self.input_size // self.patch


def position_table(cfg: MMDiTConfig, gh: int | None = None, gw: int | None = None) -> np.ndarray:
  """The fixed position embedding of the image tokens [gh * gw, width] of a gh x gw grid (default:
  the config's square grid), cropped at the centre of the `pos_embed_max_size` table (positions
  spaced base_size / max_size apart), as SD3 crops it for any aspect ratio."""
  gh = cfg.grid if gh is None else gh
  gw = cfg.grid if gw is None else gw
  size = cfg.pos_embed_max_size or cfg.grid
  base = cfg.pos_embed_base_size or size
  if max(gh, gw) > size:
    raise ValueError(
      f"An image grid of {gh}x{gw} patches does not fit the position table of {size} "
      "(config.model.pos_embed_max_size); raise it or use smaller images."
    )
  table = layers.sincos_2d(cfg.width, size, size, spacing=base / size).reshape(size, size, -1)
  top, left = (size - gh) // 2, (size - gw) // 2
  crop = table[top : top + gh, left : left + gw]
  return crop.reshape(gh * gw, cfg.width)  # [L, D]


class JointAttention(nn.Module):
  """Attention over image and text tokens joined, with per-stream projections and QK-norm.

  With `text_out=False` (the last block) the text tokens serve only as keys and values.
  """

  heads: int
  qk_norm: bool
  text_out: bool = True
  dtype: Any = jnp.float32
  attention: str = "xla"  # The kernel (`dit_jax.models.attention`).

  @nn.compact
  def __call__(self, img: jax.Array, txt: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    width = img.shape[-1]
    head_dim = width // self.heads
    qkv = {}
    for stream, x in zip(STREAMS, (img, txt), strict=True):
      for kind in ("query", "key", "value"):
        h = dense(
          (self.heads, head_dim),
          (axes.EMBED, axes.HEADS, axes.KV),
          self.dtype,
          name=f"{stream}_{kind}",
        )(x)  # [B, L_s, H, Dh]
        if self.qk_norm and kind != "value":
          h = layers.RMSNorm(name=f"{stream}_{kind[0]}_norm")(h)
        qkv[stream, kind] = constrain(h, _HEADS_ACT)
    q, k, v = (
      jnp.concatenate([qkv["img", n], qkv["txt", n]], axis=1) for n in ("query", "key", "value")
    )
    out = dot_product_attention(q, k, v, self.attention)  # [B, L_img + L_txt, H, Dh]
    n_img = img.shape[1]

    def project(stream: str, h: jax.Array) -> jax.Array:
      h = dense(
        width, (axes.HEADS, axes.KV, axes.EMBED), self.dtype, axis=(-2, -1), name=f"{stream}_out"
      )(h)
      return constrain(h, axes.TOKENS)  # [B, L_s, D]

    img_out = project("img", out[:, :n_img])
    txt_out = project("txt", out[:, n_img:]) if self.text_out else None
    return img_out, txt_out


class MMDiTBlock(nn.Module):
  """One joint block. `last=True`: the text stream is only attended to (no output, no MLP)."""

  heads: int
  mlp_ratio: float
  qk_norm: bool
  last: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(
    self, streams: tuple[jax.Array, jax.Array], cond: jax.Array
  ) -> tuple[tuple[jax.Array, jax.Array], None]:
    """streams = (image tokens [B, L, D], text tokens [B, L_txt, D]); cond [B, D]."""
    img, txt = streams
    width = img.shape[-1]
    silu_cond = nn.silu(cond)

    def modulation(stream: str, n: int) -> list[jax.Array]:
      mod = dense(
        (n, width),
        (axes.EMBED, None, axes.MLP),
        self.dtype,
        kernel_init=layers.zeros,
        name=f"{stream}_modulation",
      )(silu_cond)  # [B, n, D]
      return [mod[:, i] for i in range(n)]

    def norm(name: str, x: jax.Array) -> jax.Array:
      return layers.layer_norm(False, self.dtype, name=name)(x)

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation("img", 6)
    img_in = layers.modulate(norm("img_norm1", img), shift_a, scale_a)
    if self.last:
      t_shift_a, t_scale_a = modulation("txt", 2)
    else:
      t_shift_a, t_scale_a, t_gate_a, t_shift_m, t_scale_m, t_gate_m = modulation("txt", 6)
    txt_in = layers.modulate(norm("txt_norm1", txt), t_shift_a, t_scale_a)

    attn = JointAttention(
      self.heads, self.qk_norm, not self.last, self.dtype, self.attention, name="attn"
    )
    img_attn, txt_attn = attn(img_in, txt_in)
    hidden = int(width * self.mlp_ratio)
    img = img + gate_a[:, None] * img_attn
    img_mlp = layers.Mlp(hidden, self.dtype, name="img_mlp")
    img = img + gate_m[:, None] * img_mlp(layers.modulate(norm("img_norm2", img), shift_m, scale_m))
    if not self.last:
      txt = txt + t_gate_a[:, None] * txt_attn
      txt_mlp = layers.Mlp(hidden, self.dtype, name="txt_mlp")
      txt_h = layers.modulate(norm("txt_norm2", txt), t_shift_m, t_scale_m)
      txt = txt + t_gate_m[:, None] * txt_mlp(txt_h)
    return (constrain(img, axes.TOKENS), constrain(txt, axes.TOKENS)), None


class PooledEmbedder(nn.Module):
  """Two-layer MLP from the pooled text vector to the model width."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    h = dense(self.width, (axes.TEXT, axes.EMBED), self.dtype, name="mlp_in")(
      pooled.astype(self.dtype)
    )
    return dense(self.width, (axes.MLP, axes.EMBED), self.dtype, name="mlp_out")(nn.silu(h))


class MMDiT(nn.Module):
  """Text-conditional diffusion transformer over images [B, H, W, C] (pixels or latents)."""

  config: MMDiTConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array]) -> jax.Array:
    """Returns the prediction [B, H, W, C] at model times t [B] given the text conditioning
    cond = {"context": [B, L_txt, context_dim], "pooled": [B, pooled_dim]}."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, c = x.shape
    p = cfg.patch
    context, pooled = cond["context"], cond["pooled"]
    # Any size that divides into patches (aspect-ratio buckets); the position table checks fit.
    assert h % p == 0 and w % p == 0 and c == cfg.in_channels, (x.shape, cfg)
    assert t.shape == (b,), t.shape
    assert context.ndim == 3 and context.shape[0] == b and context.shape[2] == cfg.context_dim, (
      context.shape,
      cfg,
    )
    assert pooled.shape == (b, cfg.pooled_dim), (pooled.shape, cfg)
    gh, gw = h // p, w // p

    img = layers.patch_embed(x, p, cfg.width, dtype)  # [B, L, D]
    # Both residual streams stay float32 whatever the compute dtype (see `dit_jax.models.dit.DiT`).
    pos = jnp.asarray(position_table(cfg, gh, gw), jnp.float32)[None]
    img = constrain(img + pos, axes.TOKENS)  # [B, L, D]

    txt = dense(cfg.width, (axes.TEXT, axes.EMBED), dtype, name="context_embedder")(
      context.astype(dtype)
    )
    txt = constrain(txt.astype(jnp.float32), axes.TOKENS)  # [B, L_txt, D]

    t_emb = layers.TimestepEmbedder(cfg.width, dtype, name="t_embedder")(t)  # [B, D]
    pooled_emb = PooledEmbedder(cfg.width, dtype, name="pooled_embedder")(pooled)  # [B, D]
    cond_vec = t_emb + pooled_emb  # [B, D]

    args = (cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
    if cfg.depth > 1:
      blocks = layers.scanned(MMDiTBlock, cfg.depth - 1, cfg.scan_unroll, cfg.remat)(
        *args, False, dtype, cfg.attention, name="blocks"
      )
      (img, txt), _ = blocks((img, txt), cond_vec)
    last = layers.rematted(MMDiTBlock, cfg.remat)
    last = last(*args, True, dtype, cfg.attention, name="last_block")
    (img, _), _ = last((img, txt), cond_vec)

    final = FinalLayer(p * p * cfg.out_channels, "adaln_zero", jnp.float32, name="final")
    return layers.unpatchify(final(img, cond_vec), gh, gw, p)  # [B, H, W, C]
