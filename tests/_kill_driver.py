"""Runs `python -m dit_jax.main <args>` but SIGKILLs itself right after the asynchronous save of
checkpoint KILL_AT_SAVE has started (before it is finished): a crash in the middle of a save."""

import os
import signal
import sys

from absl import app

from dit_jax import checkpoint, main, xla_flags

KILL_AT = int(os.environ["KILL_AT_SAVE"])
_save = checkpoint.Checkpointer.save


def save_then_die(self, step, *args, **kwargs):
  _save(self, step, *args, **kwargs)
  if step == KILL_AT:
    print(f"killing myself during the save of {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


checkpoint.Checkpointer.save = save_then_die

if __name__ == "__main__":
  sys.argv[0] = "dit_jax.main"
  xla_flags.apply()  # As cli.run does for the real program.
  app.run(main.main)
