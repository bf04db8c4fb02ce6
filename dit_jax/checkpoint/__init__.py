"""One Orbax CheckpointManager per workdir: train state, data iterator position, and config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Every process takes part in saves and
restores; restores go straight into the shardings of an abstract target, whatever mesh wrote them.
"""

import contextlib
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dit_jax.errors import ConfigError


def _restore_args(abstract: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
  """Saves and restores `TrainState`s; saves are asynchronous."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only
    )
    handlers = {
      "state": ocp.PyTreeCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self, step: int, state: Any, config: ml_collections.ConfigDict, data_iterator=None
  ) -> None:
    items = {
      "state": ocp.args.PyTreeSave(state),
      "config": ocp.args.JsonSave(json.loads(config.to_json())),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_train(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the full state (and the iterator position, in place) into `abstract_state`."""
    items = {
      "state": ocp.args.PyTreeRestore(abstract_state, restore_args=_restore_args(abstract_state))
    }
    with _mismatch_errors(self, step):
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      self._restore_data(step, data_iterator)
    return restored["state"]

  def _restore_data(self, step: int, iterator) -> None:
    """Sets the iterator to its saved position, also when another process count saved it.

    Each process saves its iterator state as `data/process_<i>-of-<n>.json`. Every process reads
    its block of the same global batches, so the states are equal and any of them will do for
    any process count; states that differ (e.g. other grain worker layouts) must match exactly.
    """
    folder = epath.Path(self.directory) / str(step) / "data"
    own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      text = own.read_text()
    else:
      texts = {f.read_text() for f in folder.glob("process_*-of-*.json")}
      if len(texts) != 1:
        raise ConfigError(
          f"Checkpoint {folder.parent} holds {len(texts)} different data iterator states for "
          f"another process count, none for {jax.process_count()} process(es); resume it with "
          "the process count and config.data.num_workers that wrote it."
        )
      text = texts.pop()
    iterator.set_state(json.loads(text))

  def restore_params(self, step: int, abstract_params: Any, *, ema: bool = True) -> Any:
    """Restores only the (EMA) parameters, e.g. onto another mesh for sampling."""
    key = "ema_params" if ema else "params"
    target = {key: abstract_params}
    args = ocp.args.PyTreeRestore(target, restore_args=_restore_args(target), partial_restore=True)
    with _mismatch_errors(self, step):
      restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    return restored["state"][key]

  def saved_config(self, step: int) -> dict | None:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"
      ]
    except Exception:  # An old or partial checkpoint without the config item.
      return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@contextlib.contextmanager
def _mismatch_errors(ckpt: Checkpointer, step: int):
  """Turns Orbax's structure/shape errors into one ConfigError naming the saved config."""
  try:
    yield
  except (ValueError, KeyError, TypeError) as exc:
    saved = ckpt.saved_config(step) or {}
    model = saved.get("model", {})
    raise ConfigError(
      f"The checkpoint at {ckpt.directory}/{step} does not match this config's model "
      f"(it was written with model={model.get('name')!r} variant={model.get('variant')!r} "
      f"learn_sigma={model.get('learn_sigma')!r}, data image_size="
      f"{saved.get('data', {}).get('image_size')!r}). Use the config that wrote it, or another "
      f"--workdir. Orbax said: {str(exc)[:500]}"
    ) from exc


def log_restore(step: int, directory: str) -> None:
  if jax.process_index() == 0:
    logging.info("Restored checkpoint %d from %s.", step, directory)
