"""Released weights as dit_jax params (float32 numpy, in the layout of the Flax modules).

SD3: a diffusers `SD3Transformer2DModel` as `dit_jax.models.mmdit.MMDiT` params.

    params, overrides = load_sd3("path/to/stable-diffusion-3-medium-diffusers/transformer")

reads config.json and the safetensors file(s) of that directory (no PyTorch needed) and returns
the parameters and the config fields that describe the same architecture
(`apply_overrides(config, overrides)` sets them). The SD3.5 variants with extra self-attention in
some blocks (`dual_attention_layers`) are not supported.

DiT: a facebookresearch/DiT `models.py` state dict (e.g. the released DiT-XL-2-256x256.pt) as
`dit_jax.models.dit.DiT` params for a config of the same architecture.

    params = convert_dit(load_dit_pt("DiT-XL-2-256x256.pt"), config)
"""

import argparse
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from dit_jax import storage
from dit_jax.errors import ConfigError
from dit_jax.models import SIZES, VARIANTS, layers, variant_dims

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

  config_path = storage.join(directory, "config.json")
  names = storage.listdir(directory) if storage.isdir(directory) else []
  files = [storage.join(directory, n) for n in names if n.endswith(".safetensors")]
  if not storage.isfile(config_path) or not files:
    raise ConfigError(
      f"{directory!r} is not a diffusers SD3 transformer directory: it needs config.json and "
      "*.safetensors (e.g. <model>/transformer)."
    )
  hf = storage.read_json(config_path)
  state = {}
  for file in files:
    # The flax reader handles bfloat16, which numpy cannot hold.
    with storage.local_copy(file) as local, safe_open(local, framework="flax") as fh:
      for key in fh.keys():
        state[key] = np.asarray(fh.get_tensor(key), np.float32)
  return convert_sd3(state, hf), sd3_overrides(hf)


# --- DiT (facebookresearch/DiT) ---------------------------------------------------------------


def _dit_sizes(sd: dict[str, np.ndarray]) -> dict[str, int]:
  """The architecture a DiT state dict fixes (the heads are not stored in the weights)."""
  for key in (
    "x_embedder.proj.weight",
    "final_layer.linear.weight",
    "y_embedder.embedding_table.weight",
  ):
    if key not in sd:
      raise ConfigError(
        f"The DiT checkpoint lacks the weight {key!r}; is it a facebookresearch/DiT state dict?"
      )
  width, channels, patch, _ = sd["x_embedder.proj.weight"].shape  # [D, C, p, p]
  depth = 0
  while f"blocks.{depth}.attn.qkv.weight" in sd:
    depth += 1
  sizes = {
    "width": int(width),
    "depth": depth,
    "patch": int(patch),
    "channels": int(channels),
    "out_channels": int(sd["final_layer.linear.weight"].shape[0]) // (patch * patch),
    "num_classes": int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1,  # + the null class
  }
  if "blocks.0.mlp.fc1.weight" in sd:
    sizes["mlp_hidden"] = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
  if "pos_embed" in sd:  # [1, L, D], fixed sin-cos of a square grid.
    sizes["grid"] = round(sd["pos_embed"].shape[1] ** 0.5)
  return sizes


def _config_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  dims = variant_dims(config.model)
  channels = int(config.data.channels)
  return {
    "width": dims["width"],
    "depth": dims["depth"],
    "patch": dims["patch"],
    "channels": channels,
    "out_channels": channels * (2 if config.model.learn_sigma else 1),
    "num_classes": int(config.model.num_classes),
    "mlp_hidden": int(dims["width"] * config.model.mlp_ratio),
    "grid": int(config.data.image_size) // dims["patch"],
  }


def check_dit_architecture(
  sd: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, int]:
  """Returns the sizes of the DiT state dict `sd`.

  Raises:
    ConfigError: one sentence naming every size in which `sd` differs from `config` and the
      config fields that would match it (e.g. the variant of XL/2 weights).
  """
  if config.model.name != "dit" or config.model.conditioning != "adaln_zero":
    raise ConfigError(
      f"DiT weights need config.model.name='dit' and conditioning='adaln_zero' (got "
      f"{config.model.name!r}, {config.model.conditioning!r})."
    )
  theirs, ours = _dit_sizes(sd), _config_sizes(config)
  differ = {k for k in theirs if theirs[k] != ours[k]}
  if not differ:
    return theirs
  facts, fixes = [], []
  if differ & {"width", "depth", "patch"}:
    named = [
      v
      for v, d in VARIANTS.items()
      if (d["width"], d["depth"], d["patch"]) == (theirs["width"], theirs["depth"], theirs["patch"])
    ]
    shape = f"width {theirs['width']}, depth {theirs['depth']}, patch {theirs['patch']}"
    if named:
      facts.append(f"{shape} ({named[0]})")
      fixes.append(f"--config.model.variant={named[0]}")
    else:
      facts.append(shape)
      sizes = ", ".join(f"{k} {d['width']}" for k, d in SIZES.items())
      fixes.append(
        f"--config.model.width={theirs['width']} --config.model.depth={theirs['depth']} with "
        f"the right model.heads and a variant of patch {theirs['patch']} (widths: {sizes})"
      )
  if "channels" in differ:
    facts.append(f"{theirs['channels']} input channels")
    fixes.append(f"--config.data.channels={theirs['channels']}")
  if "out_channels" in differ and "channels" not in differ:
    sigma = theirs["out_channels"] == 2 * theirs["channels"]
    facts.append(f"{theirs['out_channels']} output channels ({'learned' if sigma else 'no'} sigma)")
    fixes.append(f"--config.model.learn_sigma={sigma}")
  if "num_classes" in differ:
    facts.append(f"{theirs['num_classes']} classes plus the null class")
    fixes.append(f"--config.model.num_classes={theirs['num_classes']}")
  if "mlp_hidden" in differ and not differ & {"width"}:
    facts.append(f"an MLP of {theirs['mlp_hidden']} hidden units")
    fixes.append(f"--config.model.mlp_ratio={theirs['mlp_hidden'] / theirs['width']}")
  if "grid" in differ and not differ & {"patch"}:
    size = theirs["grid"] * theirs["patch"]
    facts.append(f"a position table for {size}x{size} inputs")
    fixes.append(f"--config.data.image_size={size}")
  elif "grid" in differ:
    facts.append(f"a position table for a {theirs['grid']}x{theirs['grid']} grid of patches")
  raise ConfigError(
    f"The DiT checkpoint is of another architecture than the config: it has {'; '.join(facts)}; "
    f"set {' '.join(fixes)}."
  )


def check_dit_diffusion(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless `config` reads the network's output as DiT trained it: eps under
  the linear schedule of 1000 steps, no preconditioning (the same arrays would fit any)."""
  d = config.diffusion
  ours = {
    "objective": d.objective,
    "schedule": d.schedule,
    "num_timesteps": d.num_timesteps,
    "preconditioning": d.preconditioning,
  }
  theirs = {
    "objective": "eps",
    "schedule": "linear",
    "num_timesteps": 1000,
    "preconditioning": "none",
  }
  differ = [f"--config.diffusion.{k}={v}" for k, v in theirs.items() if ours[k] != v]
  if differ:
    raise ConfigError(
      "DiT weights predict eps under the linear schedule of 1000 steps without preconditioning, "
      f"which this config would misread; set {' '.join(differ)}."
    )


def dit_state_shapes(sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
  """Names and shapes of a facebookresearch/DiT state dict of the given sizes."""
  d, p, c = sizes["width"], sizes["patch"], sizes["channels"]
  shapes = {
    "x_embedder.proj.weight": (d, c, p, p),
    "x_embedder.proj.bias": (d,),
    "t_embedder.mlp.0.weight": (d, layers.TimestepEmbedder.frequency_dim),
    "t_embedder.mlp.0.bias": (d,),
    "t_embedder.mlp.2.weight": (d, d),
    "t_embedder.mlp.2.bias": (d,),
    "y_embedder.embedding_table.weight": (sizes["num_classes"] + 1, d),
    "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    "final_layer.adaLN_modulation.1.bias": (2 * d,),
    "final_layer.linear.weight": (p * p * sizes["out_channels"], d),
    "final_layer.linear.bias": (p * p * sizes["out_channels"],),
  }
  hidden = sizes["mlp_hidden"]
  block = {
    "attn.qkv.weight": (3 * d, d),
    "attn.qkv.bias": (3 * d,),
    "attn.proj.weight": (d, d),
    "attn.proj.bias": (d,),
    "mlp.fc1.weight": (hidden, d),
    "mlp.fc1.bias": (hidden,),
    "mlp.fc2.weight": (d, hidden),
    "mlp.fc2.bias": (d,),
    "adaLN_modulation.1.weight": (6 * d, d),
    "adaLN_modulation.1.bias": (6 * d,),
  }
  for i in range(sizes["depth"]):
    shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
  return shapes


def _dit_block(sd: dict, i: int, width: int, heads: int) -> Params:
  pre = f"blocks.{i}."
  head_dim = width // heads
  # The fused qkv Linear emits [q | k | v], each with its heads contiguous.
  qkv = _linear(sd, pre + "attn.qkv", (3, heads, head_dim))  # kernel [D, 3, H, Dh]
  attn = {
    name: {"kernel": qkv["kernel"][:, j], "bias": qkv["bias"][j]}
    for j, name in enumerate(("query", "key", "value"))
  }
  proj = _linear(sd, pre + "attn.proj")  # Its input features are (head, channel) flattened.
  attn["out"] = {"kernel": proj["kernel"].reshape(heads, head_dim, width), "bias": proj["bias"]}
  return {
    "attn": attn,
    "mlp": {"fc1": _linear(sd, pre + "mlp.fc1"), "fc2": _linear(sd, pre + "mlp.fc2")},
    # Chunks shift, scale, gate (attention) then shift, scale, gate (MLP), as DiTBlock reads them.
    "modulation": _linear(sd, pre + "adaLN_modulation.1", (6, width)),
  }


def convert_dit(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> Params:
  """Maps a facebookresearch/DiT state dict (numpy arrays) onto the params of the DiT that
  `config` describes (the number of heads, which the weights do not record, is the config's).

  Raises:
    ConfigError: if the weights are of another architecture than the config (one message naming
      the fields to set), or a weight is missing, misshapen or left over.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  check_dit_architecture(sd, config)
  check_dit_diffusion(config)
  sizes = _config_sizes(config)  # Equal to the checkpoint's in all that it records.
  want = dit_state_shapes(sizes)
  missing = [k for k in want if k not in sd]
  if missing:
    raise ConfigError(
      f"The DiT checkpoint lacks {len(missing)} weight(s), e.g. {missing[:3]}; is it a complete "
      "facebookresearch/DiT state dict?"
    )
  wrong = [f"{k}: {sd[k].shape}, expected {want[k]}" for k in want if sd[k].shape != want[k]]
  if wrong:
    raise ConfigError(
      f"Weights of the DiT checkpoint have unexpected shapes: {'; '.join(wrong[:5])}."
    )
  width, depth, patch = sizes["width"], sizes["depth"], sizes["patch"]
  heads = variant_dims(config.model)["heads"]
  stored_pos = sd.pop("pos_embed", None)
  if stored_pos is not None:  # Fixed, not learned: dit_jax computes the same table itself.
    grid = sizes["grid"]
    ours = layers.sincos_2d(width, grid, grid)
    if stored_pos.shape != (1, *ours.shape) or not np.allclose(stored_pos[0], ours, atol=1e-5):
      raise ConfigError(
        "The checkpoint's position table differs from the sin-cos table dit_jax uses."
      )
  conv_w = sd.pop("x_embedder.proj.weight")  # [D, C, p, p]
  params = {
    # dit_jax flattens a patch as (row, column, channel).
    "patch_embed": {
      "kernel": conv_w.transpose(2, 3, 1, 0).reshape(patch * patch * sizes["channels"], width),
      "bias": sd.pop("x_embedder.proj.bias"),
    },
    "t_embedder": {
      "mlp_in": _linear(sd, "t_embedder.mlp.0"),
      "mlp_out": _linear(sd, "t_embedder.mlp.2"),
    },
    "y_embedder": {"embedding": sd.pop("y_embedder.embedding_table.weight")},  # Null row last.
    "blocks": _stack([_dit_block(sd, i, width, heads) for i in range(depth)]),
    "final": {
      "modulation": _linear(sd, "final_layer.adaLN_modulation.1", (2, width)),  # shift, scale
      "linear": _linear(sd, "final_layer.linear"),
    },
  }
  if sd:
    raise ConfigError(f"Weights of the DiT checkpoint that dit_jax does not use: {sorted(sd)[:8]}.")
  return params


def load_dit_pt(path: str) -> dict[str, np.ndarray]:
  """Reads a facebookresearch/DiT .pt file as float32 numpy arrays: a bare state dict (the
  released models) or a checkpoint of its train.py, of which it takes the EMA weights.

  Raises:
    ConfigError: if PyTorch is missing or the file is not such a checkpoint.
  """
  try:
    import torch
  except ImportError as e:
    raise ConfigError(
      "Reading a .pt checkpoint needs PyTorch; install the `text` extra "
      "(`pip install 'dit_jax[text]'`) or `pip install torch`."
    ) from e
  if not storage.isfile(path):
    raise ConfigError(f"The DiT checkpoint {path!r} does not exist.")
  try:
    # Tensors and plain containers only (no code runs); train.py also pickles its argparse args.
    with storage.local_copy(path) as local, torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(local, map_location="cpu", weights_only=True)
  except Exception as e:  # Any unreadable file: say which and why.
    raise ConfigError(
      f"{path!r} is not a PyTorch checkpoint that torch.load can read safely "
      f"({type(e).__name__}: {str(e)[:200]})."
    ) from e
  if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
    logging.info("%s is a DiT train.py checkpoint; importing its EMA weights.", path)
    obj = obj["ema"]
  if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
    raise ConfigError(
      f"{path!r} holds no DiT state dict (a dict of tensors, or train.py's {{'ema': ...}})."
    )
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}
