"""Weights-only checkpoints: released weights imported into a workdir (`save_weights`, marked by an
`origin` item), and the parameters and EMA of any checkpoint as the start of a new run
(`restore_weights`, for train.init_from)."""

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from dit_jax import storage
from dit_jax.checkpoint.manager import ORIGIN, Checkpointer, place, tree_shapes
from dit_jax.errors import ConfigError


def check_new_workdir(workdir: str) -> None:
  """Raises ConfigError if `workdir` already holds checkpoints (or anything in their folder)."""
  directory = storage.path(storage.join(workdir, "checkpoints"))
  if directory.exists() and any(directory.iterdir()):
    raise ConfigError(
      f"{directory} is not empty (it holds {sorted(p.name for p in directory.iterdir())[:5]}); "
      "import into a new --workdir. Nothing was written."
    )


def save_weights(
  workdir: str,
  step: int,
  params: Any,
  config: ml_collections.ConfigDict,
  *,
  source: str,
  abstract: Any = None,
) -> str:
  """Writes an imported checkpoint holding only `params` (as the EMA parameters, which is what
  released weights are), the full `config` and the origin `source`; returns its directory.

  `params` are jax Arrays in their shardings, or host arrays that are first put into the
  shardings of `abstract` (`place`). Every process calls this.

  Raises:
    ConfigError: if `workdir` already holds checkpoints (nothing is written then), or the
      params do not fit `abstract`.
  """
  check_new_workdir(workdir)
  if jax.process_count() > 1:  # Every process has looked before any writes.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("dit_jax: import target checked")
  if abstract is not None:
    params = place(params, abstract)
  ckpt = Checkpointer(workdir, async_save=False, config=config)
  origin = {"weights_only": True, "source": source, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
  items = {
    "state": ocp.args.PyTreeSave({"ema_params": params}),
    "config": ocp.args.JsonSave(json.loads(config.to_json())),
    ORIGIN: ocp.args.JsonSave(origin),
  }
  try:
    ckpt.manager.save(step, args=ocp.args.Composite(**items), force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return storage.join(ckpt.directory, str(step))


# Arrays a config may add to the network of a checkpoint it starts from (train.init_from), and
# the setting that adds them. Each is zero-initialized, so the new network starts as the
# checkpoint's: TMSA's time projections (`models.layers.Attention`).
ADDED_ARRAYS = {"time_qv": "config.model.attention_conditioning='tmsa'"}


def _added(saved: dict, wanted: dict, config: ml_collections.ConfigDict | None) -> list[str]:
  """The arrays of `wanted` (paths -> shapes) missing from the checkpoint's `saved` that the
  config adds as zeros (`ADDED_ARRAYS`); [] if any other array is missing."""
  if config is None or config.model.get("attention_conditioning") != "tmsa":
    return []
  missing = [k for k in wanted if k not in saved]
  if not all(any(name in k.split("/") for name in ADDED_ARRAYS) for k in missing):
    return []
  return missing


def _without(tree: Any, paths: list[str]) -> Any:
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in paths}, sep="/")


def _with(tree: Any, source: Any, paths: list[str]) -> Any:
  """`tree` with the arrays at `paths` added from `source` (copies: the train step donates)."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  fresh = traverse_util.flatten_dict(source, sep="/")
  flat.update({k: jnp.copy(fresh[k]) for k in paths})
  return traverse_util.unflatten_dict(flat, sep="/")


def restore_weights(
  workdir: str,
  abstract_params: Any,
  config: ml_collections.ConfigDict | None = None,
  init_params: Any = None,
) -> tuple[int, Any, Any]:
  """(step, params, ema_params) of the newest checkpoint in `workdir`, restored into the
  shardings of `abstract_params`, to start a new run from (`train.init_from`).

  A training checkpoint gives its parameters and their EMA (the first, if it holds several power
  EMAs); an imported one its weights for both. Given `init_params` (the new run's initial
  parameters), the arrays `config` adds to the checkpoint's network as zeros (`ADDED_ARRAYS`:
  a plain DiT started as a TMSA one) are taken from them, so the run starts as that network.

  Raises:
    ConfigError: if `workdir` holds no checkpoint, or one of another model.
  """
  ckpt = Checkpointer(workdir, read_only=True, config=config)
  added = []

  def restore(step: int) -> tuple[Any, Any]:
    target = abstract_params
    if init_params is not None:
      # (An imported checkpoint holds its weights as "ema_params" alone.)
      saved = ckpt.saved_shapes(step, "params") or ckpt.saved_shapes(step, "ema_params")
      added[:] = _added(saved, tree_shapes(abstract_params), config)
      target = _without(abstract_params, added)
    if ckpt.origin(step) is not None:
      ema = ckpt.restore_params(step, target, ema=True)
      return jax.tree.map(jnp.copy, ema), ema  # Separate buffers: the train step donates both.
    if ckpt.num_ema(step):  # Power EMAs: the first (a new power run starts its own at step 1).
      params = ckpt.restore_params(step, target, ema=False)
      return params, ckpt.restore_params(step, target, ema=True, ema_index=0)
    parts = ckpt.restore_parts(step, {"params": target, "ema_params": target})
    return parts["params"], parts["ema_params"]

  try:
    restored = ckpt.newest_restorable(restore, set_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise _no_weights(workdir, ckpt.directory)
  step, (params, ema_params) = restored
  if added:
    params, ema_params = _with(params, init_params, added), _with(ema_params, init_params, added)
    logging.info(
      "%s has no %s, which this config adds (%s): they start at zero, so the run starts as the "
      "network of that checkpoint.",
      workdir,
      ", ".join(sorted(added)),
      "; ".join(v for k, v in ADDED_ARRAYS.items() if any(k in a.split("/") for a in added)),
    )
  return step, params, ema_params


def _no_weights(workdir: str, directory: str) -> ConfigError:
  return ConfigError(
    f"config.train.init_from={workdir!r} holds no checkpoint (looked in {directory}); "
    "point it at a training run or an imported workdir."
  )


def check_weights_source(workdir: str) -> None:
  """Raises restore_weights' error now if `workdir` holds no checkpoint at all, before a new run
  creates anything in its own workdir."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise _no_weights(workdir, ckpt.directory)
  finally:
    ckpt.close()
