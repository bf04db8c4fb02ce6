"""The one entry point: python -m dit_jax.main --config=configs/<file>.py[:arg] --workdir=DIR.

  --mode=train     train (resuming from the newest checkpoint in DIR), then sample a grid.
  --mode=sample    restore the EMA parameters and write DIR/samples/<sample.name>.npz + PNG grid.
  --mode=evaluate  restore, sample and score; writes DIR/eval/<eval.name>.json.
Sampling and evaluating need no --config: they read the one saved in DIR's newest checkpoint. A
--config given with them sets sampling, scoring, VAE, mesh and data-location fields; one that
differs from the run's model, diffusion or data shape is an error naming the field.
DIR may be a local directory or a gs:// URL (pip install 'dit_jax[gcs]').
  --overwrite      let sample / evaluate replace an existing samples/<sample.name>.npz or
                   eval/<eval.name>.json (without it they stop with an error and keep the file).
Any config field can be set with --config.<field>=<value>; unknown fields are errors. A bad
command line ends in one line `Error: ...` (dit_jax.cli).
"""

import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from dit_jax import cli, storage
from dit_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate"], "What to run.")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Let sample / evaluate replace the samples or scores of the same name."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for a multi-process run on a cluster JAX cannot detect (GPU hosts, "
  "local test processes); TPU pods, SLURM and Open MPI need no flags.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None and _MODE.value == "train":
    raise ConfigError(
      "--mode=train needs --config=configs/<file>.py (sampling and evaluating a run read the "
      "config saved in its workdir)."
    )
  # A gs:// workdir: the gcs extra, the service and the bucket, before anything else.
  storage.check_reachable(workdir)
  if config is not None:
    cli.check_config_paths(config)
  existing = "" if storage.is_remote(workdir) else storage.nearest_existing(workdir)
  if existing and storage.isfile(existing):
    where = (
      "is a file"
      if existing == storage.resolve(workdir)
      else f"is inside {existing}, which is a file"
    )
    sys.exit(
      f"Error: --workdir={workdir} {where}, not a directory; pass a new directory or the "
      "workdir of a run."
    )
  # JAX is imported only now, so that a bad command line is reported at once.
  import jax

  from dit_jax import utils

  utils.quiet_library_logs()
  try:
    from dit_jax.parallel import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value != "train":
      from dit_jax.evaluation import runner

      config = runner.run_config(workdir, config)
      cli.check_config_paths(config)
    from dit_jax import checks

    checks.validate(config)
    if jax.process_index() == 0:
      logging.info("Config:\n%s", config)
    if _MODE.value == "train":
      from dit_jax.evaluation import hooks
      from dit_jax.train import loop

      loop.run(config, workdir, hooks.TrainingHooks(workdir))
    elif _MODE.value == "sample":
      runner.sample(config, workdir, overwrite=_OVERWRITE.value)
    else:
      scores = runner.evaluate(config, workdir, overwrite=_OVERWRITE.value)
      if jax.process_index() == 0:
        print(json.dumps(scores, indent=2))
  except OSError as e:
    message = cli.workdir_error(e, workdir)
    if message is None:
      raise
    sys.exit(f"Error: {message}")


if __name__ == "__main__":
  cli.run(main)
