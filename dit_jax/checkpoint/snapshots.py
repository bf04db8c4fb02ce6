"""Snapshots of power-function EMAs for post-hoc EMA (EDM2): `WORKDIR/ema_snapshots/<step>`, kept
apart from the checkpoints and never deleted by their retention."""

import json
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from dit_jax import storage
from dit_jax.checkpoint.manager import manager_options, restore_args

SNAPSHOTS = "ema_snapshots"


class EmaSnapshots:
  """The power EMAs of a run every train.ema.snapshot_every steps, for post-hoc EMA.

  Layout: `WORKDIR/ema_snapshots/<step>/{state,profiles,config}`: `state` = {"ema_params": the
  tuple of EMAs}, `profiles` = {"std": [...], "gamma": [...]} in the same order, and the run's
  config. Orbax checkpoints, so they restore into the shardings of any mesh; none is ever
  deleted. A snapshot that exists is not written again: a resumed run repeats the same steps
  exactly, so it would be the same.
  """

  def __init__(self, workdir: str, *, async_save: bool = True, read_only: bool = False):
    self.directory = storage.join(workdir, SNAPSHOTS)
    options = manager_options(read_only, async_save)  # Never deleted: no retention.
    handlers = {
      "state": ocp.PyTreeCheckpointHandler(),
      "profiles": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    ema_params: tuple,
    std: tuple[float, ...],
    gammas: tuple[float, ...],
    config: ml_collections.ConfigDict,
  ) -> bool:
    """Starts writing the snapshot of `step` unless it exists; returns whether it did."""
    if step in self.manager.all_steps():
      return False
    items = {
      "state": ocp.args.PyTreeSave({"ema_params": tuple(ema_params)}),
      "profiles": ocp.args.JsonSave({"std": list(std), "gamma": list(gammas)}),
      "config": ocp.args.JsonSave(json.loads(config.to_json())),
    }
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    return True

  def profiles(self, step: int) -> dict:
    """{"std": [...], "gamma": [...]} of the EMAs of the snapshot at `step`."""
    items = ocp.args.Composite(profiles=ocp.args.JsonRestore())
    return self.manager.restore(step, args=items)["profiles"]

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  def restore(self, step: int, abstract_params: Any) -> tuple:
    """The EMAs of the snapshot at `step`, each in the shardings of `abstract_params`."""
    count = len(self.profiles(step)["std"])
    target = {"ema_params": tuple(abstract_params for _ in range(count))}
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args(target))
    restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    return tuple(restored["state"]["ema_params"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
