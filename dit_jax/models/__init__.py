"""Model registry: sizes come from a variant table, classes from `config.model.name`."""

from typing import TYPE_CHECKING

import ml_collections

from dit_jax import config_defaults
from dit_jax.data import buckets
from dit_jax.errors import ConfigError, check_choice, check_numbers
from dit_jax.models.classifier import Classifier, ClassifierConfig
from dit_jax.models.dit import DiT, DiTConfig
from dit_jax.models.mmdit import MMDiT, MMDiTConfig

if TYPE_CHECKING:  # The data's text layout, of which the models read only the sizes.
  from dit_jax.data.text import TextSpec

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
# MMDiT (SD3 paper): depth d, width 64 d, d heads of 64, patch 2; d=24 is SD3-medium (2B).
MMDIT_VARIANTS = {f"d{d}": dict(width=64 * d, depth=d, heads=d, patch=2) for d in range(2, 41)}
# "classifier": the noise-aware classifier of classifier guidance, sized by the DiT table.
MODELS = ("dit", "mmdit", "classifier")

# What each number in config.model accepts (see errors.check_numbers).
NUMBERS = (
  ("model.num_classes", "> 0", ""),
  ("model.class_dropout", "in [0, 1)", " (the probability of training without the label)"),
  ("model.text_dropout", "in [0, 1)", " (the probability of dropping each text encoder)"),
  ("model.width", ">= 0", " (0 = the variant's)"),
  ("model.depth", ">= 0", " (0 = the variant's)"),
  ("model.heads", ">= 0", " (0 = the variant's)"),
  ("model.mlp_ratio", "> 0", ""),
  ("model.scan_unroll", "> 0", " (blocks per scan iteration)"),
  ("model.pos_embed_max_size", ">= 0", " (0 = the image's grid)"),
  ("model.pos_embed_base_size", ">= 0", " (0 = pos_embed_max_size)"),
  ("model.context_len", ">= 0", " (0 = the data's)"),
  ("model.context_dim", ">= 0", " (0 = the data's)"),
  ("model.pooled_dim", ">= 0", " (0 = the data's)"),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for config.model's name or a number in it that cannot work (the
  variant and the fields that depend on the data are checked when the model is built)."""
  check_choice(config.model.name, MODELS, "model.name")
  check_choice(
    config.model.text_dropout_to, config_defaults.TEXT_DROPOUT_TO, "model.text_dropout_to"
  )
  check_numbers(config, NUMBERS)


def variant_dims(model: ml_collections.ConfigDict) -> dict:
  """Width, depth, heads and patch of `model.variant`, with the config's non-zero overrides."""
  table = MMDIT_VARIANTS if model.name == "mmdit" else VARIANTS
  if model.variant not in table:
    raise ConfigError(
      f"config.model.variant={model.variant!r} is not a {model.name} size; choose one of "
      + (
        "'d2' ... 'd40' (depth d; 'd24' = SD3-medium)."
        if model.name == "mmdit"
        else f"{list(table)}."
      )
    )
  dims = dict(table[model.variant])
  for key in ("width", "depth", "heads"):
    if model[key]:
      dims[key] = int(model[key])
  return dims


def build_model(
  config: ml_collections.ConfigDict, text_spec: "TextSpec | None" = None
) -> DiT | MMDiT | Classifier:
  """Returns the Flax module selected by `config.model` for images of `config.data` (and, for
  MMDiT, the text layout `text_spec` of the data)."""
  m = config.model
  check_choice(m.name, MODELS, "model.name")
  check_choice(m.conditioning, config_defaults.CONDITIONINGS, "model.conditioning")
  check_choice(m.dtype, config_defaults.DTYPES, "model.dtype")
  check_choice(m.remat, config_defaults.REMAT_POLICIES, "model.remat")
  check_choice(m.attention, config_defaults.ATTENTIONS, "model.attention")
  check_choice(
    m.attention_conditioning,
    config_defaults.ATTENTION_CONDITIONINGS,
    "model.attention_conditioning",
  )
  if m.attention_conditioning != "none" and m.name != "dit":
    raise ConfigError(
      f"config.model.attention_conditioning={m.attention_conditioning!r} is supported for "
      f"model.name='dit' only, not {m.name!r}; set config.model.attention_conditioning='none'."
    )
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
  sizes = buckets.parse(config.data.buckets)
  if sizes and m.name != "mmdit":
    raise ConfigError(
      f"config.data.buckets={config.data.buckets!r} is for config.model.name='mmdit' (its "
      f"position table crops to any aspect ratio), not {m.name!r}; set config.data.buckets=''."
    )
  if m.name == "mmdit":
    if m.learn_sigma:
      raise ConfigError("config.model.learn_sigma=True is not supported for mmdit; set it False.")
    assert text_spec is not None, "MMDiT needs the data's text layout"
    buckets.check(sizes, dims["patch"])
    # The position table: pos_embed_max_size, or 0: the largest grid side trained on.
    table = m.pos_embed_max_size or max(
      s // dims["patch"] for hw in ((size, size), *sizes) for s in hw
    )
    sample_sizes = buckets.parse(config.sample.size, "config.sample.size")
    buckets.check(sample_sizes, dims["patch"], "config.sample.size")
    for what, hws in (
      ("config.data.image_size and buckets", ((size, size), *sizes)),
      ("config.sample.size", sample_sizes),
    ):
      side = max((s // dims["patch"] for hw in hws for s in hw), default=0)
      if side > table:
        raise ConfigError(
          f"The image grid side of {side} patches ({what}) does not fit the position table of "
          f"{table} (config.model.pos_embed_max_size={m.pos_embed_max_size}); raise "
          "pos_embed_max_size or use smaller images."
        )
    return MMDiT(
      MMDiTConfig(
        input_size=size,
        in_channels=channels,
        context_dim=text_spec.context_dim,
        pooled_dim=text_spec.pooled_dim,
        mlp_ratio=m.mlp_ratio,
        qk_norm=m.qk_norm,
        pos_embed_max_size=m.pos_embed_max_size or (table if sizes else 0),
        pos_embed_base_size=m.pos_embed_base_size,
        dtype=m.dtype,
        remat=m.remat,
        scan_unroll=m.scan_unroll,
        attention=m.attention,
        **dims,
      )
    )
  if m.name == "classifier":
    return _build_classifier(config, dims)
  if m.learn_sigma and config.diffusion.objective == "rectified_flow":
    raise ConfigError(
      "config.model.learn_sigma=True needs a VP objective (config.diffusion.objective=eps or v): "
      "rectified flow has no variance to learn."
    )
  cfg = DiTConfig(
    input_size=size,
    in_channels=channels,
    num_classes=m.num_classes,
    learn_sigma=m.learn_sigma,
    conditioning=m.conditioning,
    dtype=m.dtype,
    remat=m.remat,
    scan_unroll=m.scan_unroll,
    attention=m.attention,
    attention_conditioning=m.attention_conditioning,
    mlp_ratio=m.mlp_ratio,
    **dims,
  )
  return DiT(cfg)


def _build_classifier(config: ml_collections.ConfigDict, dims: dict) -> Classifier:
  m = config.model
  if m.learn_sigma:
    raise ConfigError(
      "config.model.learn_sigma=True has no meaning for config.model.name='classifier' (it "
      "predicts class logits, not a variance); set it False."
    )
  if config.data.name == "shapes":
    raise ConfigError(
      f"config.model.name='classifier' predicts class labels, but config.data.name="
      f"{config.data.name!r} has captions, not labels; train it on class-labelled data "
      "(digits, tfds, folder, latents with labels.npy)."
    )
  return Classifier(
    ClassifierConfig(
      input_size=config.data.image_size,
      in_channels=config.data.channels,
      num_classes=m.num_classes,
      mlp_ratio=m.mlp_ratio,
      dtype=m.dtype,
      remat=m.remat,
      scan_unroll=m.scan_unroll,
      attention=m.attention,
      **dims,
    )
  )
