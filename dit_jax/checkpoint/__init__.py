"""Checkpoints: one Orbax CheckpointManager per workdir (train state, data position, config;
`manager`), EMA snapshots for post-hoc EMA (`snapshots`), weights-only imports and starts
(`weights`).

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Every process takes part in saves and
restores; restores go straight into the shardings of an abstract target, whatever mesh wrote them.

With power-function EMAs (train.ema.kind="power") `state.ema_params` is a tuple of trees, one
per train.ema.std; sampling reads one of them (`restore_params(ema_index=...)`), and their
snapshots for post-hoc EMA are kept apart, never deleted, in `WORKDIR/ema_snapshots/<step>`
(`EmaSnapshots`).

An imported checkpoint (`save_weights`: released DiT or SD3 weights) holds only the weights, as
`state = {"ema_params": ...}`, with the config and an `origin` item saying where they came from.
Sampling restores it like any other; training cannot resume it, but starts from it in a new
workdir with `train.init_from` (`restore_weights`).
"""

from dit_jax.checkpoint.manager import (
  ORIGIN,
  Checkpointer,
  CheckpointError,
  log_restore,
  place,
  restore_args,
)
from dit_jax.checkpoint.settle import settled_failed_reads
from dit_jax.checkpoint.snapshots import SNAPSHOTS, EmaSnapshots
from dit_jax.checkpoint.weights import (
  check_new_workdir,
  check_weights_source,
  restore_weights,
  save_weights,
)

__all__ = [
  "ORIGIN",
  "SNAPSHOTS",
  "CheckpointError",
  "Checkpointer",
  "EmaSnapshots",
  "check_new_workdir",
  "check_weights_source",
  "log_restore",
  "place",
  "restore_args",
  "restore_weights",
  "save_weights",
  "settled_failed_reads",
]
