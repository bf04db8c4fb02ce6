"""The one entry point: python -m dit_jax.main --config=configs/<file>.py[:arg] --workdir=DIR.

  --mode=train     train (resuming from the newest checkpoint in DIR), then sample a grid.
  --mode=sample    restore the EMA parameters and write DIR/samples/<sample.name>.npz + PNG grid.
  --mode=evaluate  restore, sample and score; writes DIR/eval/<eval.name>.json.
Any config field can be set with --config.<field>=<value>; unknown fields are errors.
"""

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import utils
from dit_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 for a multi-process run on a cluster JAX cannot detect (GPU hosts, "
  "local test processes); TPU pods, SLURM and Open MPI need no flags.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  utils.quiet_library_logs()
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    from dit_jax.parallel import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() == 0:
      logging.info("Config:\n%s", config)
    if _MODE.value == "train":
      from dit_jax.train import loop

      loop.run(config, workdir)
    elif _MODE.value == "sample":
      from dit_jax.evaluation import runner

      runner.sample(config, workdir)
    else:
      from dit_jax.evaluation import runner

      scores = runner.evaluate(config, workdir)
      if jax.process_index() == 0:
        print(json.dumps(scores, indent=2))
  except ConfigError as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  app.run(main)
