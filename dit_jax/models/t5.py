"""T5's encoder in Flax (T5 v1.1, e.g. T5-XXL, SD3's third text encoder), read from `transformers`.

    config, params = load_hf("sd3/text_encoder_3")
    out = T5Encoder(config, "bfloat16").apply({"params": params}, ids)  # ids int32 [B, L]
    out["last"], out["penultimate"]

The architecture of `transformers`' T5EncoderModel: a token embedding, pre-RMSNorm layers of
unscaled self-attention with a learned relative position bias (bucketed distances, computed once
and shared by every layer) and a gated-GELU (v1.1) or ReLU (v1.0) MLP, then a final RMSNorm.
Weights load from the safetensors of a T5EncoderModel or of a whole T5 (its encoder half).

Numerics: the residual stream, the norms, the position bias, attention logits and softmax are
float32; the matrix products run in the compute dtype. (T5 in float16 overflows, which is why
transformers clamps its activations; bfloat16 with a float32 residual stream does not.)
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import axes
from dit_jax.errors import ConfigError
from dit_jax.models import clip, hf, layers

Params = dict[str, Any]
WHAT = "T5EncoderModel"
# transformers' T5Config defaults, for the fields a saved config.json leaves out.
_HF_DEFAULTS = dict(
  vocab_size=32128,
  d_model=512,
  d_kv=64,
  d_ff=2048,
  num_layers=6,
  num_heads=8,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  layer_norm_epsilon=1e-6,
  feed_forward_proj="relu",
)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 encoder sizes. `activation` "gelu_new" with `gated` is v1.1's gated-gelu."""

  vocab_size: int
  width: int
  depth: int
  heads: int
  head_dim: int
  mlp_dim: int
  buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  activation: str = "gelu_new"
  gated: bool = True

  @classmethod
  def from_hf(cls, hf_config: dict) -> "T5Config":
    c = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    proj = str(c["feed_forward_proj"])
    parts = proj.split("-")
    if (
      len(parts) > 2
      or (len(parts) == 2 and parts[0] != "gated")
      or parts[-1]
      not in (
        "gelu",
        "relu",
      )
    ):
      raise ConfigError(
        f"T5 feed_forward_proj={proj!r} is not supported ('relu', 'gelu', 'gated-gelu' or "
        "'gated-relu')."
      )
    act = parts[-1]
    return cls(
      vocab_size=int(c["vocab_size"]),
      width=int(c["d_model"]),
      depth=int(c["num_layers"]),
      heads=int(c["num_heads"]),
      head_dim=int(c["d_kv"]),
      mlp_dim=int(c["d_ff"]),
      buckets=int(c["relative_attention_num_buckets"]),
      max_distance=int(c["relative_attention_max_distance"]),
      eps=float(c["layer_norm_epsilon"]),
      # transformers maps "gated-gelu" to the tanh approximation ("gelu_new").
      activation="gelu_new" if proj == "gated-gelu" else act,
      gated=parts[0] == "gated",
    )


# google/t5-v1_1-xxl's encoder (SD3's text_encoder_3): 4.76B parameters.
T5_XXL = T5Config(32128, 4096, 24, 64, 64, 10240)


def relative_buckets(length: int, buckets: int, max_distance: int) -> np.ndarray:
  """Bucket int32 [L, L] of the distance key - query, bidirectional (T5's encoder): half the
  buckets for each sign, each half exact for small distances and logarithmic up to
  `max_distance`. In float32 as transformers computes it, so the boundaries fall alike."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [Lq, Lk]
  half = buckets // 2
  out = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  scaled = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact)) / np.float32(
    math.log(max_distance / exact)
  )
  large = exact + (scaled * np.float32(half - exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (out + np.where(dist < exact, dist, large)).astype(np.int32)


class RMSNorm(nn.Module):
  """T5's LayerNorm: x / rms(x) * scale, in float32, no mean subtracted and no bias."""

  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", layers.logical(nn.initializers.ones_init(), (axes.EMBED,)), (x.shape[-1],)
    )
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class T5Layer(nn.Module):
  """Self-attention then MLP, each after an RMSNorm and added back; the carry is (hidden
  [B, L, D] float32, the previous layer's hidden), the position bias [H, L, L] is broadcast."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], bias: jax.Array):
    cfg, dt = self.config, self.dtype
    h, _ = carry
    init = nn.initializers.normal(cfg.width**-0.5)
    qkv_axes = (axes.EMBED, axes.HEADS, axes.KV)
    x = RMSNorm(cfg.eps, name="layer_norm")(h).astype(dt)
    q, k, v = (
      layers.dense(
        (cfg.heads, cfg.head_dim), qkv_axes, dt, kernel_init=init, use_bias=False, name=n
      )(x)
      for n in ("q", "k", "v")
    )  # [B, L, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = clip.attention_probs(logits + bias[None], dt)  # T5 does not scale the logits.
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    o = layers.dense(
      cfg.width,
      (axes.HEADS, axes.KV, axes.EMBED),
      dt,
      axis=(-2, -1),
      kernel_init=init,
      use_bias=False,
      name="o",
    )(o)
    h2 = layers.constrain(h + o, axes.TOKENS)

    y = RMSNorm(cfg.eps, name="ff_layer_norm")(h2).astype(dt)

    def up(name):
      return layers.dense(
        cfg.mlp_dim, (axes.EMBED, axes.MLP), dt, kernel_init=init, use_bias=False, name=name
      )(y)

    a = clip.activation(cfg.activation, up("wi_0" if cfg.gated else "wi").astype(jnp.float32))
    if cfg.gated:
      a = a * up("wi_1").astype(jnp.float32)
    y = layers.dense(
      cfg.width, (axes.MLP, axes.EMBED), dt, kernel_init=init, use_bias=False, name="wo"
    )(a.astype(dt))
    return (layers.constrain(h2 + y, axes.TOKENS), h), None


class T5Encoder(nn.Module):
  """T5's encoder: token ids int32 [B, L] -> {"last": after the final norm, "penultimate": the
  second-to-last layer's output} [B, L, D] float32. No attention mask: every token, padding
  included, is attended to, as SD3 encodes its captions."""

  config: T5Config
  dtype: Any = jnp.float32
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, ids: jax.Array) -> dict[str, jax.Array]:
    cfg = self.config
    table = self.param(
      "shared",
      layers.logical(nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)),
      (cfg.vocab_size, cfg.width),
      jnp.float32,
    )
    rel = self.param(
      "relative_attention_bias",
      layers.logical(nn.initializers.normal(1.0), (None, axes.HEADS)),
      (cfg.buckets, cfg.heads),
      jnp.float32,
    )
    n = ids.shape[1]
    bias = jnp.take(rel, relative_buckets(n, cfg.buckets, cfg.max_distance), axis=0)  # [L, L, H]
    bias = bias.astype(jnp.float32).transpose(2, 0, 1)  # [H, Lq, Lk]
    h = layers.constrain(jnp.take(table, ids, axis=0).astype(jnp.float32), axes.TOKENS)
    stack = layers.scanned(T5Layer, cfg.depth, self.scan_unroll, "none", broadcast=1)(
      cfg, self.dtype, name="layers"
    )
    (h, penultimate), _ = stack((h, h), bias)
    return {"last": RMSNorm(cfg.eps, name="final_layer_norm")(h), "penultimate": penultimate}


def _kernel(w: hf.Weights, name: str, shape: tuple[int, ...], in_dims: int, dt) -> Params:
  """A bias-free Linear's weight [out, in] as a kernel of `shape` ([*in, *out])."""
  torch_shape = (int(np.prod(shape[in_dims:])), int(np.prod(shape[:in_dims])))
  return {"kernel": w.get(f"{name}.weight", torch_shape, dt).T.reshape(shape)}


def _layer(w: hf.Weights, i: int, cfg: T5Config, dt) -> Params:
  attn, ff = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
  heads = (cfg.heads, cfg.head_dim)
  p = {
    "layer_norm": {"scale": w.get(f"{attn}.layer_norm.weight", (cfg.width,), dt)},
    **{n: _kernel(w, f"{attn}.SelfAttention.{n}", (cfg.width, *heads), 1, dt) for n in "qkv"},
    "o": _kernel(w, f"{attn}.SelfAttention.o", (*heads, cfg.width), 2, dt),
    "ff_layer_norm": {"scale": w.get(f"{ff}.layer_norm.weight", (cfg.width,), dt)},
    "wo": _kernel(w, f"{ff}.DenseReluDense.wo", (cfg.mlp_dim, cfg.width), 1, dt),
  }
  for n in ("wi_0", "wi_1") if cfg.gated else ("wi",):
    p[n] = _kernel(w, f"{ff}.DenseReluDense.{n}", (cfg.width, cfg.mlp_dim), 1, dt)
  return p


def load_hf(directory: str, dtype: str = "float32") -> tuple[T5Config, Params]:
  """Reads the encoder of a transformers T5 directory (config.json + safetensors, local): a
  T5EncoderModel (SD3's text_encoder_3) or a whole T5 model, of which the decoder is ignored.

  Raises:
    ConfigError: for a directory that holds no T5, or weights that do not match its config.
  """
  config_json = hf.read_config(directory, WHAT)
  if config_json.get("model_type") not in ("t5", "umt5"):
    found = config_json.get("model_type") or "model of no model_type"
    raise ConfigError(
      f"{directory!r} holds a {found}, not a T5 encoder ({WHAT}); pass T5's directory (in an "
      "SD3 pipeline: text_encoder_3)."
    )
  if config_json.get("model_type") == "umt5":
    raise ConfigError(
      f"{directory!r} holds a UMT5, whose layers each have their own position bias; dit_jax's "
      "T5 encoder implements T5 v1.0/v1.1 (one shared bias)."
    )
  cfg = T5Config.from_hf(config_json)
  dt = hf.numpy_dtype(dtype)
  with hf.open_weights(directory) as w:
    table = "shared.weight" if "shared.weight" in w else "encoder.embed_tokens.weight"
    params = {
      "shared": w.get(table, (cfg.vocab_size, cfg.width), dt),
      "relative_attention_bias": w.get(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (cfg.buckets, cfg.heads),
        dt,
      ),
      "layers": clip.stack_layers([_layer(w, i, cfg, dt) for i in range(cfg.depth)]),
      "final_layer_norm": {"scale": w.get("encoder.final_layer_norm.weight", (cfg.width,), dt)},
    }
    w.check_all_used(ignore=("encoder.embed_tokens.", "shared.", "decoder.", "lm_head."))
  return cfg, params
