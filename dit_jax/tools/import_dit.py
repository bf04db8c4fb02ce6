"""Imports released DiT weights (facebookresearch/DiT) as a dit_jax checkpoint.

  python -m dit_jax.tools.import_dit --checkpoint=DiT-XL-2-256x256.pt \\
      --config=configs/dit_imagenet256.py:variant=XL/2 --workdir=DIR
  python -m dit_jax.main --config=configs/dit_imagenet256.py:variant=XL/2 --workdir=DIR \\
      --mode=sample --config.sample.guided_channels=3

--checkpoint is a .pt of DiT's models.py: a released model (its EMA weights) or a checkpoint of
its train.py (whose EMA weights are taken). The config must describe the same architecture
(variant, classes, learned sigma, input size); if it does not, the error names the fields to set.
DIR then holds the weights only: sample from it on any mesh, or fine-tune from it in a new workdir
with --config.train.init_from=DIR. Needs torch to read the .pt (`pip install torch`).
"""

from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from dit_jax import checkpoint, cli, storage, utils


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that other tools can import this one."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A facebookresearch/DiT .pt file.")
  flags.DEFINE_string("workdir", None, "A new directory for the imported checkpoint.")
  flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def save_imported(
  params: Any,
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  source: str,
  layout_config: ml_collections.ConfigDict | None = None,
) -> str:
  """Writes converted (numpy) `params` as the weights-only checkpoint of `workdir`, straight into
  the shardings of this config's mesh; returns the checkpoint's directory.

  `layout_config` (default `config`) is the config whose model and mesh lay out the params.
  """
  from dit_jax import experiment

  exp = experiment.build(layout_config or config, training=False)
  path = checkpoint.save_weights(
    workdir, 0, params, config, source=source, abstract=exp.abstract_state.params
  )
  if jax.process_index() == 0:
    n = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    logging.info("Imported %s: %.2fM parameters, written to %s.", source, n / 1e6, path)
  return path


def import_dit(checkpoint_path: str, config: ml_collections.ConfigDict, workdir: str) -> str:
  """Converts a facebookresearch/DiT .pt for `config` and saves it in `workdir` (which must hold
  no checkpoint); returns the checkpoint's directory."""
  from dit_jax.models import convert

  checkpoint.check_new_workdir(workdir)  # Before reading a file of gigabytes.
  params = convert.convert_dit(convert.load_dit_pt(checkpoint_path), config)
  return save_imported(params, config, workdir, source=storage.resolve(checkpoint_path))


def main(argv):
  del argv
  utils.quiet_library_logs()
  storage.check_reachable(flags.FLAGS.checkpoint, flags.FLAGS.workdir)
  import_dit(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
