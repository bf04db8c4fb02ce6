"""Model registry: sizes come from a variant table, classes from `config.model.name`."""

import ml_collections

from dit_jax import config_defaults
from dit_jax.errors import ConfigError, check_choice
from dit_jax.models.dit import DiT, DiTConfig

# DiT Table 1, plus two small sizes for CPU runs and tests ("mini", "tiny").
SIZES = {
  "tiny": dict(width=64, depth=2, heads=2),
  "mini": dict(width=128, depth=6, heads=4),
  "S": dict(width=384, depth=12, heads=6),
  "B": dict(width=768, depth=12, heads=12),
  "L": dict(width=1024, depth=24, heads=16),
  "XL": dict(width=1152, depth=28, heads=16),
}
PATCHES = (2, 4, 8)
VARIANTS = {f"{size}/{p}": dict(SIZES[size], patch=p) for size in SIZES for p in PATCHES}
MODELS = ("dit",)


def variant_dims(model: ml_collections.ConfigDict) -> dict:
  """Width, depth, heads and patch of `model.variant`, with the config's non-zero overrides."""
  check_choice(model.variant, VARIANTS, "model.variant")
  dims = dict(VARIANTS[model.variant])
  for key in ("width", "depth", "heads"):
    if model[key]:
      dims[key] = int(model[key])
  return dims


def build_model(config: ml_collections.ConfigDict) -> DiT:
  """Returns the Flax module selected by `config.model` for images of `config.data`."""
  m = config.model
  check_choice(m.name, MODELS, "model.name")
  check_choice(m.conditioning, config_defaults.CONDITIONINGS, "model.conditioning")
  check_choice(m.dtype, config_defaults.DTYPES, "model.dtype")
  check_choice(m.remat, config_defaults.REMAT_POLICIES, "model.remat")
  dims = variant_dims(m)
  size, channels = config.data.image_size, config.data.channels
  if size % dims["patch"]:
    raise ConfigError(
      f"config.data.image_size={size} is not divisible by the patch size {dims['patch']} of "
      f"config.model.variant={m.variant!r}; pick a variant with a smaller patch."
    )
  if dims["width"] % dims["heads"] or dims["width"] % 4:
    raise ConfigError(
      f"model width {dims['width']} must be divisible by 4 and by heads={dims['heads']} "
      "(config.model.width / config.model.heads)."
    )
  if m.learn_sigma and config.diffusion.objective == "rectified_flow":
    raise ConfigError(
      "config.model.learn_sigma=True needs a VP objective (config.diffusion.objective=eps or v): "
      "rectified flow has no variance to learn."
    )
  cfg = DiTConfig(
    input_size=size,
    in_channels=channels,
    num_classes=m.num_classes,
    class_dropout=m.class_dropout,
    learn_sigma=m.learn_sigma,
    conditioning=m.conditioning,
    dtype=m.dtype,
    remat=m.remat,
    scan_unroll=m.scan_unroll,
    mlp_ratio=m.mlp_ratio,
    **dims,
  )
  return DiT(cfg)
