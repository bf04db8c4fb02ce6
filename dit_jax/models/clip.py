"""CLIP's text tower in Flax, read from a Hugging Face `transformers` directory.

    config, params = load_text_hf("sd3/text_encoder")   # CLIP-L; text_encoder_2 is OpenCLIP bigG
    out = CLIPText(config, "bfloat16").apply({"params": params}, ids)  # ids int32 [B, L]
    out["penultimate"], out["last"], out["text_embeds"]

The architecture of `transformers`' CLIPTextModelWithProjection: token plus learned position
embeddings, pre-LayerNorm causal self-attention layers (scanned), a final LayerNorm, the pooled
vector taken at the end-of-text token and projected. The OpenCLIP bigG/14 tower of SD3 is the same
architecture with exact GELU. Weights load from the safetensors of a CLIPTextModel[WithProjection]
or of a whole CLIPModel (its text half).

Numerics: the residual stream, LayerNorms, attention logits and softmax are float32; the matrix
products run in the compute dtype (float32 or bfloat16).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import axes
from dit_jax.errors import ConfigError
from dit_jax.models import hf, layers

Params = dict[str, Any]
ACTIVATIONS = ("quick_gelu", "gelu")
# transformers' CLIPTextConfig defaults, for the fields a saved config.json leaves out.
_HF_DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  projection_dim=512,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  eos_token_id=49407,
)
WHAT = "CLIPTextModelWithProjection"


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP text tower sizes. `projection_dim` 0: no text projection (a plain CLIPTextModel)."""

  vocab_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  max_positions: int
  projection_dim: int
  activation: str = "quick_gelu"
  eps: float = 1e-5
  # transformers pools at argmax(ids) when this is 2 (configs saved before the eos fix), else
  # at the first token equal to it.
  eos_token_id: int = 49407

  @classmethod
  def from_hf(cls, hf_config: dict, has_projection: bool = True) -> "CLIPTextConfig":
    """The config of a CLIPTextConfig dict, or of a CLIPConfig's text half."""
    top = hf_config
    if hf_config.get("model_type") == "clip" or "text_config" in hf_config:
      hf_config = hf_config.get("text_config") or {}
    c = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    projection = top.get("projection_dim") or c["projection_dim"]
    eos = c["eos_token_id"]
    config = cls(
      vocab_size=int(c["vocab_size"]),
      width=int(c["hidden_size"]),
      depth=int(c["num_hidden_layers"]),
      heads=int(c["num_attention_heads"]),
      mlp_dim=int(c["intermediate_size"]),
      max_positions=int(c["max_position_embeddings"]),
      projection_dim=int(projection) if has_projection else 0,
      activation=str(c["hidden_act"]),
      eps=float(c["layer_norm_eps"]),
      eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
    )
    config.check()
    return config

  def check(self) -> None:
    if self.activation not in ACTIVATIONS:
      raise ConfigError(
        f"CLIP hidden_act={self.activation!r} is not one of {list(ACTIVATIONS)} (CLIP-L uses "
        "quick_gelu, OpenCLIP bigG gelu)."
      )
    if self.width % self.heads:
      raise ConfigError(f"CLIP hidden_size {self.width} is not divisible by {self.heads} heads.")


# SD3's CLIPs as released (text_encoder: openai CLIP ViT-L/14, whose config keeps the legacy
# eos_token_id=2; text_encoder_2: OpenCLIP ViT-bigG/14), for benchmarks and compile checks.
CLIP_L = CLIPTextConfig(49408, 768, 12, 12, 3072, 77, 768, "quick_gelu", 1e-5, 2)
CLIP_G = CLIPTextConfig(49408, 1280, 32, 20, 5120, 77, 1280, "gelu", 1e-5, 49407)


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":  # The tanh approximation (T5 v1.1).
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  raise AssertionError(name)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """A float32 LayerNorm with logical axes (its output is cast by the caller)."""
  return nn.LayerNorm(
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scale_init=layers.logical(nn.initializers.ones_init(), (axes.EMBED,)),
    bias_init=layers.logical(layers.zeros, (axes.EMBED,)),
    name=name,
  )


def attention_probs(logits: jax.Array, dtype) -> jax.Array:
  """softmax in float32 over the last axis, cast to `dtype`."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class EncoderLayer(nn.Module):
  """A pre-LayerNorm transformer layer (CLIP's). The carry is (hidden [B, L, D] float32, the
  previous layer's hidden), so that after a scan the second is the penultimate hidden state."""

  width: int
  heads: int
  mlp_dim: int
  activation: str
  eps: float
  causal: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array]):
    h, _ = carry
    head_dim = self.width // self.heads
    qkv_axes = (axes.EMBED, axes.HEADS, axes.KV)

    x = layer_norm(self.eps, "layer_norm1")(h).astype(self.dtype)
    q, k, v = (
      layers.dense((self.heads, head_dim), qkv_axes, self.dtype, name=f"{n}_proj")(x)
      for n in ("q", "k", "v")
    )  # [B, L, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5)  # [B, H, L, L]
    if self.causal:
      n = h.shape[1]
      mask = np.tril(np.ones((n, n), bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    o = jnp.einsum("bhqk,bkhd->bqhd", attention_probs(logits, self.dtype), v)
    o = layers.dense(
      self.width, (axes.HEADS, axes.KV, axes.EMBED), self.dtype, axis=(-2, -1), name="out_proj"
    )(o)
    h2 = layers.constrain(h + o, axes.TOKENS)

    y = layer_norm(self.eps, "layer_norm2")(h2).astype(self.dtype)
    y = layers.dense(self.mlp_dim, (axes.EMBED, axes.MLP), self.dtype, name="fc1")(y)
    y = activation(self.activation, y.astype(jnp.float32)).astype(self.dtype)
    y = layers.dense(self.width, (axes.MLP, axes.EMBED), self.dtype, name="fc2")(y)
    return (layers.constrain(h2 + y, axes.TOKENS), h), None


class CLIPText(nn.Module):
  """CLIP's text tower: token ids int32 [B, L] (L <= max_positions) -> dict of
  "last" (after the final LayerNorm) and "penultimate" (the second-to-last layer's output, no
  LayerNorm; SD3's conditioning) [B, L, D] float32, "pooled" [B, D] at the end-of-text token, and
  "text_embeds" [B, projection_dim] if the tower has a projection."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, ids: jax.Array) -> dict[str, jax.Array]:
    cfg = self.config
    b, n = ids.shape
    assert n <= cfg.max_positions, (n, cfg.max_positions)
    init = nn.initializers.normal(0.02)
    tokens = self.param(
      "token_embedding",
      layers.logical(init, (axes.VOCAB, axes.EMBED)),
      (cfg.vocab_size, cfg.width),
      jnp.float32,
    )
    positions = self.param(
      "position_embedding",
      layers.logical(init, (None, axes.EMBED)),
      (cfg.max_positions, cfg.width),
      jnp.float32,
    )
    h = jnp.take(tokens, ids, axis=0).astype(jnp.float32) + positions[None, :n]  # [B, L, D]
    h = layers.constrain(h, axes.TOKENS)
    stack = layers.scanned(EncoderLayer, cfg.depth, self.scan_unroll, "none", broadcast=0)(
      cfg.width, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.eps, True, self.dtype, name="layers"
    )
    (h, penultimate), _ = stack((h, h))
    last = layer_norm(cfg.eps, "final_layer_norm")(h)
    if cfg.eos_token_id == 2:
      at = jnp.argmax(ids, axis=-1)
    else:
      at = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, at[:, None, None], axis=1)[:, 0]  # [B, D]
    out = {"last": last, "penultimate": penultimate, "pooled": pooled}
    if cfg.projection_dim:
      proj = layers.dense(
        cfg.projection_dim,
        (axes.EMBED, axes.TEXT),
        self.dtype,
        use_bias=False,
        name="text_projection",
      )
      out["text_embeds"] = proj(pooled.astype(self.dtype)).astype(jnp.float32)
    return out


# --- Weights: transformers' names and layouts (Linear weights are [out, in]) -------------------


def _linear(w: hf.Weights, name: str, shape: tuple[int, ...], bias: bool, in_dims: int, dt):
  """A Linear's weight [out, in] as a kernel of `shape` ([*in, *out]) and its bias."""
  in_shape, out_shape = shape[:in_dims], shape[in_dims:]
  torch_shape = (int(np.prod(out_shape)), int(np.prod(in_shape)))
  kernel = w.get(f"{name}.weight", torch_shape, dt).T.reshape(shape)
  if not bias:
    return {"kernel": kernel}
  return {"kernel": kernel, "bias": w.get(f"{name}.bias", (torch_shape[0],), dt).reshape(out_shape)}


def _norm(w: hf.Weights, name: str, width: int, dt) -> Params:
  return {
    "scale": w.get(f"{name}.weight", (width,), dt),
    "bias": w.get(f"{name}.bias", (width,), dt),
  }


def stack_layers(per_layer: list[Params]) -> Params:
  """Layer params stacked along a leading axis (the scanned layout)."""
  return jax.tree.map(lambda *a: np.stack(a), *per_layer)


def encoder_layer_params(w: hf.Weights, prefix: str, width: int, heads: int, mlp: int, dt):
  """One CLIP encoder layer's params from `prefix` (e.g. "text_model.encoder.layers.3")."""
  dh = width // heads
  attn = f"{prefix}.self_attn"
  return {
    "layer_norm1": _norm(w, f"{prefix}.layer_norm1", width, dt),
    "layer_norm2": _norm(w, f"{prefix}.layer_norm2", width, dt),
    **{
      f"{n}_proj": _linear(w, f"{attn}.{n}_proj", (width, heads, dh), True, 1, dt)
      for n in ("q", "k", "v")
    },
    "out_proj": _linear(w, f"{attn}.out_proj", (heads, dh, width), True, 2, dt),
    "fc1": _linear(w, f"{prefix}.mlp.fc1", (width, mlp), True, 1, dt),
    "fc2": _linear(w, f"{prefix}.mlp.fc2", (mlp, width), True, 1, dt),
  }


def text_params(w: hf.Weights, config: CLIPTextConfig, dtype: str = "float32") -> Params:
  """`CLIPText` params from the tensors of a CLIPTextModel[WithProjection] or CLIPModel (under
  "text_model."; transformers v5 saves a plain CLIPTextModel's without that prefix)."""
  dt = hf.numpy_dtype(dtype)
  c = config
  t = "text_model." if "text_model.embeddings.token_embedding.weight" in w else ""
  params = {
    "token_embedding": w.get(f"{t}embeddings.token_embedding.weight", (c.vocab_size, c.width), dt),
    "position_embedding": w.get(
      f"{t}embeddings.position_embedding.weight", (c.max_positions, c.width), dt
    ),
    "layers": stack_layers(
      [
        encoder_layer_params(w, f"{t}encoder.layers.{i}", c.width, c.heads, c.mlp_dim, dt)
        for i in range(c.depth)
      ]
    ),
    "final_layer_norm": _norm(w, f"{t}final_layer_norm", c.width, dt),
  }
  if c.projection_dim:
    params["text_projection"] = _linear(
      w, "text_projection", (c.width, c.projection_dim), False, 1, dt
    )
  return params


def load_text_hf(directory: str, dtype: str = "float32") -> tuple[CLIPTextConfig, Params]:
  """Reads the text tower of a transformers CLIP directory (config.json + safetensors, local).

  Args:
    directory: a CLIPTextModelWithProjection (SD3's text_encoder, text_encoder_2), a
      CLIPTextModel (no projection: `text_embeds` is then absent) or a CLIPModel.
    dtype: the params' numpy dtype ("float32", "bfloat16" or "float16").

  Raises:
    ConfigError: for a directory that holds no CLIP, or weights that do not match its config.
  """
  config_json = hf.read_config(directory, WHAT)
  model_type = config_json.get("model_type")
  if model_type not in ("clip_text_model", "clip"):
    raise ConfigError(
      f"{directory!r} holds a {model_type or 'model of no model_type'}, not a CLIP text encoder "
      f"({WHAT}); pass CLIP's directory (in an SD3 pipeline: text_encoder or text_encoder_2)."
    )
  with hf.open_weights(directory) as w:
    config = CLIPTextConfig.from_hf(config_json, has_projection="text_projection.weight" in w)
    params = text_params(w, config, dtype)
    w.check_all_used(
      ignore=(
        "vision_model.",
        "visual_projection.",
        "logit_scale",
        "text_model.embeddings.position_ids",
      )
    )
  return config, params


# --- The image tower and the whole CLIP (for the CLIP score) -----------------------------------

_HF_VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)
# CLIP's image normalization (transformers' CLIPImageProcessor, OpenAI's release).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  image_size: int
  patch: int
  projection_dim: int
  activation: str = "quick_gelu"
  eps: float = 1e-5

  @classmethod
  def from_hf(cls, hf_config: dict) -> "CLIPVisionConfig":
    """The image half of a CLIPConfig dict."""
    v = hf_config.get("vision_config") or {}
    c = {**_HF_VISION_DEFAULTS, **{k: val for k, val in v.items() if val is not None}}
    return cls(
      width=int(c["hidden_size"]),
      depth=int(c["num_hidden_layers"]),
      heads=int(c["num_attention_heads"]),
      mlp_dim=int(c["intermediate_size"]),
      image_size=int(c["image_size"]),
      patch=int(c["patch_size"]),
      projection_dim=int(hf_config.get("projection_dim") or 512),
      activation=str(c["hidden_act"]),
      eps=float(c["layer_norm_eps"]),
    )

  @property
  def grid(self) -> int:
    return self.image_size // self.patch


class CLIPVision(nn.Module):
  """CLIP's image tower: pixels [B, S, S, 3] (S = image_size, normalized by IMAGE_MEAN/STD) ->
  the projected image embedding [B, projection_dim] float32."""

  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    b = pixels.shape[0]
    assert pixels.shape[1:] == (cfg.image_size, cfg.image_size, 3), pixels.shape
    p, g = cfg.patch, cfg.grid
    patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, p * p * 3).astype(self.dtype)  # [B, N, p*p*3] (h, w, c)
    tokens = layers.dense(
      cfg.width, (axes.PATCH, axes.EMBED), self.dtype, use_bias=False, name="patch_embedding"
    )(patches).astype(jnp.float32)
    init = nn.initializers.normal(0.02)
    cls_token = self.param(
      "class_embedding", layers.logical(init, (axes.EMBED,)), (cfg.width,), jnp.float32
    )
    positions = self.param(
      "position_embedding",
      layers.logical(init, (None, axes.EMBED)),
      (g * g + 1, cfg.width),
      jnp.float32,
    )
    h = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, cfg.width)), tokens], axis=1)
    h = layers.constrain(layer_norm(cfg.eps, "pre_layrnorm")(h + positions[None]), axes.TOKENS)
    stack = layers.scanned(EncoderLayer, cfg.depth, 1, "none", broadcast=0)(
      cfg.width, cfg.heads, cfg.mlp_dim, cfg.activation, cfg.eps, False, self.dtype, name="layers"
    )
    (h, _), _ = stack((h, h))
    pooled = layer_norm(cfg.eps, "post_layernorm")(h[:, 0])
    proj = layers.dense(
      cfg.projection_dim, (axes.EMBED, axes.TEXT), self.dtype, use_bias=False, name="projection"
    )
    return proj(pooled.astype(self.dtype)).astype(jnp.float32)


def vision_params(w: hf.Weights, config: CLIPVisionConfig, dtype: str = "float32") -> Params:
  """`CLIPVision` params from the tensors of a CLIPModel (or CLIPVisionModelWithProjection)."""
  dt = hf.numpy_dtype(dtype)
  c = config
  conv = w.get("vision_model.embeddings.patch_embedding.weight", (c.width, 3, c.patch, c.patch), dt)
  return {
    # [D, 3, p, p] -> [p, p, 3, D] flattened as the patches are: (h, w, channel).
    "patch_embedding": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, c.width)},
    "class_embedding": w.get("vision_model.embeddings.class_embedding", (c.width,), dt),
    "position_embedding": w.get(
      "vision_model.embeddings.position_embedding.weight", (c.grid**2 + 1, c.width), dt
    ),
    "pre_layrnorm": _norm(w, "vision_model.pre_layrnorm", c.width, dt),
    "layers": stack_layers(
      [
        encoder_layer_params(w, f"vision_model.encoder.layers.{i}", c.width, c.heads, c.mlp_dim, dt)
        for i in range(c.depth)
      ]
    ),
    "post_layernorm": _norm(w, "vision_model.post_layernorm", c.width, dt),
    "projection": _linear(w, "visual_projection", (c.width, c.projection_dim), False, 1, dt),
  }


@dataclasses.dataclass(frozen=True)
class CLIP:
  """A whole CLIP (both towers), read by `load_hf`."""

  text: CLIPTextConfig
  vision: CLIPVisionConfig
  text_params: Params
  vision_params: Params
  logit_scale: float


def load_hf(directory: str, dtype: str = "float32") -> CLIP:
  """Reads a transformers CLIPModel directory (config.json + safetensors, local), e.g.
  openai/clip-vit-large-patch14, the model of the CLIP score.

  Raises:
    ConfigError: for a directory that holds no CLIPModel, or weights that do not match.
  """
  config_json = hf.read_config(directory, "CLIPModel")
  if config_json.get("model_type") != "clip":
    raise ConfigError(
      f"{directory!r} holds a {config_json.get('model_type') or 'model of no model_type'}, not a "
      "CLIPModel with both towers (the CLIP score needs the image tower too); pass e.g. a saved "
      "openai/clip-vit-large-patch14."
    )
  text_config = CLIPTextConfig.from_hf(config_json)
  vision_config = CLIPVisionConfig.from_hf(config_json)
  with hf.open_weights(directory) as w:
    text = text_params(w, text_config, dtype)
    vision = vision_params(w, vision_config, dtype)
    scale = float(np.exp(w.get("logit_scale", (), np.float32)))
    w.check_all_used(
      ignore=("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
    )
  return CLIP(text_config, vision_config, text, vision, scale)
