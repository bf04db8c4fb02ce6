"""Imports Stable Diffusion 3's transformer (diffusers format) as a dit_jax MMDiT checkpoint.

  python -m dit_jax.tools.import_sd3 --transformer=sd3-medium/transformer \\
      --config=configs/mmdit_sd3.py:variant=d24 --config.model.qk_norm=False \\
      --config.model.pos_embed_max_size=192 --config.model.pos_embed_base_size=64 --workdir=DIR

--transformer is a directory with config.json and *.safetensors (`SD3Transformer2DModel`); no
PyTorch is needed. The config must describe the same architecture: where it does not, the error
lists the flags to add (SD3-medium: those above), which sampling and fine-tuning from DIR then
take too. The text sizes (context_dim 4096, pooled_dim 2048) come from the transformer and must
agree with config.model's where that sets them. DIR then holds the weights only: sample from it on
any mesh, or fine-tune from it in a new workdir with --config.train.init_from=DIR.
"""

from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from dit_jax import checkpoint, cli, storage, utils
from dit_jax.errors import ConfigError
from dit_jax.tools.import_dit import save_imported


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that other code can import this module."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string(
    "transformer", None, "A diffusers SD3Transformer2DModel directory (config.json, *.safetensors)."
  )
  flags.DEFINE_string("workdir", None, "A new directory for the imported checkpoint.")
  flags.mark_flags_as_required(["config", "transformer", "workdir"])


def check_config(config: ml_collections.ConfigDict, overrides: dict[str, dict[str, Any]]) -> None:
  """Raises ConfigError naming every field in which `config` describes another architecture than
  the transformer's `overrides` (`convert.sd3_overrides`), with the flags that fix them."""
  from dit_jax.models import MMDIT_VARIANTS, variant_dims

  m, ck = config.model, overrides["model"]
  if m.name != "mmdit":
    raise ConfigError(
      f"SD3 weights need config.model.name='mmdit' (got {m.name!r}); use configs/mmdit_sd3.py."
    )
  differ, fixes = [], []
  dims = variant_dims(m)
  if any(dims[k] != ck[k] for k in ("width", "depth", "heads")):
    differ.append(
      "width, depth, heads = {width}, {depth}, {heads} in the checkpoint, ".format(**ck)
      + "{width}, {depth}, {heads} in the config".format(**dims)
    )
    fixes.append(f"--config.model.variant={ck['variant']}")
    table = MMDIT_VARIANTS.get(ck["variant"], {})
    for key in ("width", "heads"):
      if table.get(key) != ck[key] or (m[key] and m[key] != ck[key]):
        fixes.append(f"--config.model.{key}={ck[key]}")
  grid = config.data.image_size // dims["patch"]
  pos_max = m.pos_embed_max_size or grid
  ours = {
    "model.qk_norm": m.qk_norm,
    "model.learn_sigma": m.learn_sigma,
    "model.pos_embed_max_size": pos_max,
    # 0 means "the max size", which the fix above sets to the checkpoint's.
    "model.pos_embed_base_size": m.pos_embed_base_size or ck["pos_embed_max_size"],
    "data.channels": config.data.channels,
  }
  theirs = {
    "model.qk_norm": ck["qk_norm"],
    "model.learn_sigma": ck["learn_sigma"],
    "model.pos_embed_max_size": ck["pos_embed_max_size"],
    "model.pos_embed_base_size": ck["pos_embed_base_size"],
    "data.channels": overrides["data"]["channels"],
  }
  for key in ("context_dim", "pooled_dim"):
    if m[key]:  # 0 takes the data's.
      ours[f"model.{key}"], theirs[f"model.{key}"] = m[key], ck[key]
  for field, value in theirs.items():
    if ours[field] != value:
      differ.append(f"{field}={value!r} in the checkpoint, {ours[field]!r} in the config")
      fixes.append(f"--config.{field}={value}")
  if differ:
    raise ConfigError(
      f"The SD3 transformer is of another architecture than the config: {'; '.join(differ)}; "
      f"add {' '.join(fixes)} (and the same flags to sample or fine-tune from the import)."
    )


def import_sd3(transformer: str, config: ml_collections.ConfigDict, workdir: str) -> str:
  """Converts a diffusers SD3 transformer directory for `config` and saves it in `workdir` (which
  must hold no checkpoint); returns the checkpoint's directory."""
  from dit_jax.models import convert

  checkpoint.check_new_workdir(workdir)
  params, overrides = convert.load_sd3(transformer)
  check_config(config, overrides)
  # The parameters' shapes depend on the text widths only, which the weights fix: lay them out
  # with synthetic text of those widths, so that no encoded data need be at hand.
  layout = config.copy_and_resolve_references()
  layout.data.name = "synthetic"
  layout.model.context_len = layout.model.context_len or 1
  layout.model.context_dim = overrides["model"]["context_dim"]
  layout.model.pooled_dim = overrides["model"]["pooled_dim"]
  return save_imported(
    params, config, workdir, source=storage.resolve(transformer), layout_config=layout
  )


def main(argv):
  del argv
  utils.quiet_library_logs()
  storage.check_reachable(flags.FLAGS.transformer, flags.FLAGS.workdir)
  import_sd3(flags.FLAGS.transformer, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
