"""Weights of a diffusers `SD3Transformer2DModel` (Stable Diffusion 3) as dit_jax MMDiT params.

    params, overrides = load_sd3("path/to/stable-diffusion-3-medium-diffusers/transformer")

reads config.json and the safetensors file(s) of that directory (no PyTorch needed) and returns
the parameters in the layout of `dit_jax.models.mmdit.MMDiT` (float32 numpy) and the config
fields that describe the same architecture (`apply_overrides(config, overrides)` sets them).
The SD3.5 variants with extra self-attention in some blocks (`dual_attention_layers`) are not
supported.
"""

import glob
import json
import os
from typing import Any

import ml_collections
import numpy as np

from dit_jax.errors import ConfigError
from dit_jax.models import layers

Params = dict[str, Any]


def sd3_overrides(hf: dict) -> dict[str, dict[str, Any]]:
  """dit_jax config fields ({"model": {...}, "data": {...}}) equal to the diffusers config `hf`."""
  if hf.get("dual_attention_layers"):
    raise ConfigError(
      "This SD3Transformer2DModel has dual_attention_layers (SD3.5 MMDiT-X), which dit_jax's MMDiT "
      "does not implement."
    )
  depth, heads = int(hf["num_layers"]), int(hf["num_attention_heads"])
  width = heads * int(hf["attention_head_dim"])
  if int(hf.get("caption_projection_dim", width)) != width:
    raise ConfigError(
      f"caption_projection_dim={hf['caption_projection_dim']} differs from the model width "
      f"{width}; dit_jax's MMDiT embeds the context at the model width."
    )
  out_channels = hf.get("out_channels") or hf["in_channels"]
  if out_channels != hf["in_channels"]:
    raise ConfigError(f"out_channels={out_channels} differs from in_channels={hf['in_channels']}.")
  qk_norm = hf.get("qk_norm")
  if qk_norm not in (None, "rms_norm"):
    raise ConfigError(f"qk_norm={qk_norm!r} is not supported (None or 'rms_norm').")
  patch = int(hf["patch_size"])
  if patch != 2 or depth < 2:
    raise ConfigError(
      f"dit_jax's MMDiT variants use patch 2 and depth >= 2 (got {patch}, {depth})."
    )
  return {
    "model": {
      "name": "mmdit",
      "variant": f"d{depth}",
      "width": width,
      "depth": depth,
      "heads": heads,
      "qk_norm": qk_norm == "rms_norm",
      "pos_embed_max_size": int(hf["pos_embed_max_size"]),
      "pos_embed_base_size": int(hf["sample_size"]) // patch,
      "context_dim": int(hf["joint_attention_dim"]),
      "pooled_dim": int(hf["pooled_projection_dim"]),
      "learn_sigma": False,
    },
    "data": {"channels": int(hf["in_channels"])},
  }


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  for section, fields in overrides.items():
    for key, value in fields.items():
      config[section][key] = value


def _linear(sd: dict, name: str, out_shape: tuple[int, ...] | None = None) -> Params:
  """A torch Linear (weight [out, in]) as {"kernel": [in, *out_shape], "bias": [*out_shape]}."""
  w, b = sd.pop(f"{name}.weight"), sd.pop(f"{name}.bias")
  out_shape = out_shape or (w.shape[0],)
  return {"kernel": w.T.reshape(w.shape[1], *out_shape), "bias": b.reshape(out_shape)}


def _swap_halves(p: Params) -> Params:
  """diffusers' AdaLayerNormContinuous emits (scale, shift); dit_jax modulations (shift, scale)."""
  return {"kernel": p["kernel"][:, ::-1].copy(), "bias": p["bias"][::-1].copy()}


def _block(sd: dict, i: int, width: int, heads: int, last: bool) -> Params:
  pre = f"transformer_blocks.{i}."
  head_dim = width // heads
  heads_out = (heads, head_dim)
  attn = {}
  names = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}
  for stream, (q, k, v) in names.items():
    for kind, src in zip(("query", "key", "value"), (q, k, v), strict=True):
      attn[f"{stream}_{kind}"] = _linear(sd, pre + "attn." + src, heads_out)
  norms = {"img_q_norm": "norm_q", "img_k_norm": "norm_k"}
  norms |= {"txt_q_norm": "norm_added_q", "txt_k_norm": "norm_added_k"}
  for ours, theirs in norms.items():
    key = f"{pre}attn.{theirs}.weight"
    if key in sd:
      attn[ours] = {"scale": sd.pop(key)}

  def out_proj(name: str) -> Params:
    p = _linear(sd, pre + name)
    return {"kernel": p["kernel"].reshape(heads, head_dim, width), "bias": p["bias"]}

  attn["img_out"] = out_proj("attn.to_out.0")
  block = {
    "attn": attn,
    "img_modulation": _linear(sd, pre + "norm1.linear", (6, width)),
    "img_mlp": {"fc1": _linear(sd, pre + "ff.net.0.proj"), "fc2": _linear(sd, pre + "ff.net.2")},
  }
  if last:
    block["txt_modulation"] = _swap_halves(_linear(sd, pre + "norm1_context.linear", (2, width)))
  else:
    attn["txt_out"] = out_proj("attn.to_add_out")
    block["txt_modulation"] = _linear(sd, pre + "norm1_context.linear", (6, width))
    block["txt_mlp"] = {
      "fc1": _linear(sd, pre + "ff_context.net.0.proj"),
      "fc2": _linear(sd, pre + "ff_context.net.2"),
    }
  return block


def convert_sd3(state_dict: dict[str, np.ndarray], hf: dict) -> Params:
  """Maps a diffusers SD3 transformer state dict (numpy arrays) onto dit_jax MMDiT params.

  Raises:
    ConfigError: if an expected weight is missing, or weights are left over.
  """
  overrides = sd3_overrides(hf)["model"]
  width, depth, heads = overrides["width"], overrides["depth"], overrides["heads"]
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  try:
    conv_w = sd.pop("pos_embed.proj.weight")  # [D, C, p, p]
    d, c, p, _ = conv_w.shape
    params = {
      "patch_embed": {
        "kernel": conv_w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
        "bias": sd.pop("pos_embed.proj.bias"),
      },
      "t_embedder": {
        "mlp_in": _linear(sd, "time_text_embed.timestep_embedder.linear_1"),
        "mlp_out": _linear(sd, "time_text_embed.timestep_embedder.linear_2"),
      },
      "pooled_embedder": {
        "mlp_in": _linear(sd, "time_text_embed.text_embedder.linear_1"),
        "mlp_out": _linear(sd, "time_text_embed.text_embedder.linear_2"),
      },
      "context_embedder": _linear(sd, "context_embedder"),
      "final": {
        "modulation": _swap_halves(_linear(sd, "norm_out.linear", (2, width))),
        "linear": _linear(sd, "proj_out"),
      },
    }
    blocks = [_block(sd, i, width, heads, last=False) for i in range(depth - 1)]
    params["blocks"] = {} if not blocks else _stack(blocks)
    params["last_block"] = _block(sd, depth - 1, width, heads, last=True)
  except KeyError as e:
    raise ConfigError(
      f"The SD3 checkpoint lacks the weight {e}; is it an SD3Transformer2DModel?"
    ) from e
  stored_pos = sd.pop("pos_embed.pos_embed", None)
  if stored_pos is not None:
    size = overrides["pos_embed_max_size"]
    spacing = overrides["pos_embed_base_size"] / size
    ours = layers.sincos_2d(width, size, size, spacing=spacing)
    if not np.allclose(stored_pos.reshape(ours.shape), ours, atol=1e-3):
      raise ConfigError(
        "The checkpoint's position table differs from the sin-cos table dit_jax uses."
      )
  if sd:
    raise ConfigError(f"Weights of the SD3 checkpoint that dit_jax does not use: {sorted(sd)[:8]}.")
  return params


def _stack(blocks: list[Params]) -> Params:
  if isinstance(blocks[0], dict):
    return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
  return np.stack(blocks)


def load_sd3(directory: str) -> tuple[Params, dict]:
  """Reads a diffusers SD3 transformer directory (config.json + *.safetensors).

  Returns:
    (params, overrides): MMDiT params (float32 numpy) and the config fields of the architecture.
  """
  from safetensors import safe_open

  config_path = os.path.join(directory, "config.json")
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not os.path.isfile(config_path) or not files:
    raise ConfigError(
      f"{directory!r} is not a diffusers SD3 transformer directory: it needs config.json and "
      "*.safetensors (e.g. <model>/transformer)."
    )
  with open(config_path) as f:
    hf = json.load(f)
  state = {}
  for file in files:
    # The flax reader handles bfloat16, which numpy cannot hold.
    with safe_open(file, framework="flax") as fh:
      for key in fh.keys():
        state[key] = np.asarray(fh.get_tensor(key), np.float32)
  return convert_sd3(state, hf), sd3_overrides(hf)
