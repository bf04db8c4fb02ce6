"""The checkpoint manager: one Orbax CheckpointManager per workdir, holding the train state, the
data iterator's position and the config, restored straight into the shardings of an abstract
target whatever mesh wrote them; it names what differs when a checkpoint is of another model."""

import json
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dit_jax import storage
from dit_jax.checkpoint.settle import settled_failed_reads
from dit_jax.errors import ConfigError

ORIGIN = "origin"  # The item that marks a weights-only (imported) checkpoint.


def restore_args(abstract: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(abstract)


def manager_options(
  read_only: bool, async_save: bool, keep: int | None = None, keep_every: int = 0
) -> ocp.CheckpointManagerOptions:
  """Orbax manager options of a writable (every step saved when asked, `keep` newest kept plus
  every `keep_every`-th, None/0 = all) or a read-only directory (no retention policy: Orbax would
  drop it with a warning)."""
  return ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else keep,
    keep_period=None if read_only else keep_every or None,
    create=not read_only,
    read_only=read_only,
    save_interval_steps=0 if read_only else 1,
    enable_async_checkpointing=async_save,
  )


class CheckpointError(ConfigError):
  """No checkpoint in the workdir can be restored (and none was silently skipped)."""


def _brief(e: Exception, limit: int = 400) -> str:
  """`Type: message` of a failed read, without the tensorstore spec (a long JSON) it appends."""
  text = f"{type(e).__name__}: {str(e).split(' [tensorstore_spec=')[0]}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
  """Saves and restores `TrainState`s; saves are asynchronous unless `async_save=False`."""

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    keep_every: int = 0,
    async_save: bool = True,
    read_only: bool = False,
    config: ml_collections.ConfigDict | None = None,
  ):
    """`config`: the run's config, named in error messages next to a checkpoint's own."""
    self.config = config
    self.directory = storage.join(workdir, "checkpoints")
    options = manager_options(read_only, async_save, keep=keep, keep_every=keep_every)
    handlers = {
      "state": ocp.PyTreeCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      ORIGIN: ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

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
    origin = self.origin(step)
    if origin is not None:
      raise ConfigError(
        f"The checkpoint {self.directory}/{step} holds imported weights only (no optimizer state; "
        f"from {origin.get('source')!r}), so training cannot resume it; fine-tune from it in a "
        f"new workdir with --config.train.init_from={storage.parent(self.directory)}"
      )
    self.check_structure(step, abstract_state)
    self.check_prediction(step)
    items = {
      "state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args(abstract_state))
    }
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      self._restore_data(step, data_iterator)
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None if there is none at all.

    A checkpoint that cannot be read (corrupt or partly written files) is skipped with a warning
    and moved aside to `<step>.damaged-<time>` (never deleted), and the next older one is tried.
    A checkpoint of another model raises at once. If checkpoints exist but none restores, this
    raises rather than letting training start from scratch.
    """
    return self.newest_restorable(
      lambda step: self.restore_train(step, abstract_state, data_iterator), set_aside=True
    )

  def restore_latest_params(
    self, abstract_params: Any, *, ema: bool = True, ema_index: int = 0
  ) -> tuple[int, Any] | None:
    """(step, params) of the newest checkpoint whose parameters restore (damaged newer ones are
    skipped with a warning and left in place), or None if there is no checkpoint."""
    return self.newest_restorable(
      lambda step: self.restore_params(step, abstract_params, ema=ema, ema_index=ema_index),
      set_aside=False,
    )

  def newest_restorable(self, restore, *, set_aside: bool):
    """(step, restore(step)) for the newest step whose `restore` succeeds, trying older ones past
    checkpoints that cannot be read (moved aside to `<step>.damaged-<time>` if `set_aside`);
    None if there is no checkpoint. A ConfigError (another model) is raised at once."""
    damaged = []
    with settled_failed_reads():
      for step in reversed(self.all_steps()):
        try:
          value = restore(step)
        except ConfigError:
          raise
        except Exception as e:  # Unreadable: fall back to the previous checkpoint.
          logging.warning(
            "Checkpoint %d in %s cannot be restored: %s", step, self.directory, _brief(e)
          )
          damaged.append((step, e))
          continue
        if damaged:  # Each was named in its own warning already.
          steps = [s for s, _ in damaged]
          moved = f"; they are moved aside to {self._set_aside(steps)}" if set_aside else ""
          logging.info("Using checkpoint %d, as %s cannot be restored%s.", step, steps, moved)
        return step, value
    if damaged:
      step, e = damaged[0]
      raise CheckpointError(
        f"None of the {len(damaged)} checkpoint(s) in {self.directory} can be restored (newest, "
        f"{step}: {_brief(e, 300)}). Not starting from scratch over them: "
        "repair them, or move the directory aside to start a new run."
      )
    return None

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames damaged step directories so that new saves at those steps do not collide; returns
    the new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = [f"{step}.damaged-{stamp}" for step in steps]
    if jax.process_index() == 0:
      for step, name in zip(steps, names, strict=True):
        storage.rename(storage.join(self.directory, str(step)), storage.join(self.directory, name))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("dit_jax: damaged checkpoints moved aside")
    self.manager.reload()
    return names

  def num_ema(self, step: int) -> int:
    """How many power EMAs the checkpoint holds (train.ema.kind="power"); 0 for one exponential
    EMA (or imported weights)."""
    saved = self.manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    ema = saved.get("ema_params") if hasattr(saved, "get") else None
    return len(ema) if isinstance(ema, (list, tuple)) else 0

  def restore_params(
    self, step: int, abstract_params: Any, *, ema: bool = True, ema_index: int = 0
  ) -> Any:
    """Restores only the (EMA) parameters, e.g. onto another mesh for sampling.

    An imported checkpoint holds one set of weights (the released EMA weights), which serves for
    `ema=False` too. Of a checkpoint with several power EMAs only the one at `ema_index` (0-based,
    in the order of its train.ema.std) is read.
    """
    if ema:
      count = self.num_ema(step)
      if ema_index >= max(count, 1):
        held = f"{count} EMAs" if count else "one EMA"
        raise ConfigError(
          f"config.sample.ema_index={ema_index}, but the checkpoint {self.directory}/{step} holds "
          f"{held}; choose 0..{max(count, 1) - 1}."
        )
      if count:
        self.check_structure(step, {"ema_params": [abstract_params] * count}, only="ema_params")
        self.check_prediction(step)
        skip = jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract_params)
        parts = [abstract_params if i == ema_index else skip for i in range(count)]
        target = {"ema_params": parts}
        args = ocp.args.PyTreeRestore(
          target, restore_args=restore_args(target), partial_restore=True
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"]["ema_params"][ema_index]
    key = "ema_params" if ema else "params"
    if not ema and self.origin(step) is not None:
      logging.info(
        "Checkpoint %d in %s holds imported weights only; using them as the raw parameters "
        "(they are the released EMA weights).",
        step,
        self.directory,
      )
      key = "ema_params"
    return self.restore_parts(step, {key: abstract_params})[key]

  def restore_parts(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
    """Restores the named top-level parts of the state (e.g. params and ema_params) alone."""
    self.check_structure(step, target, only=tuple(target))
    self.check_prediction(step)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args(target), partial_restore=True)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    return {k: restored["state"][k] for k in target}

  def origin(self, step: int) -> dict | None:
    """Where the weights of an imported checkpoint came from (None for a training checkpoint)."""
    if ORIGIN not in self.manager.item_metadata(step).keys():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(**{ORIGIN: ocp.args.JsonRestore()}))[
      ORIGIN
    ]

  def saved_shapes(self, step: int, part: str) -> dict[str, tuple[int, ...]]:
    """{"blocks/attn/qkv/kernel": shape, ...} of the top-level part `part` of checkpoint `step`'s
    state (e.g. "ema_params"), read from its metadata; {} if it has no such part."""
    saved_tree = self.manager.item_metadata(step)["state"]
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    return tree_shapes(saved_tree[part]) if part in saved_tree else {}

  def check_structure(
    self, step: int, abstract: Any, only: str | tuple[str, ...] | None = None
  ) -> None:
    """Raises ConfigError naming the arrays whose names or shapes differ from the checkpoint's
    (only among the top-level parts `only` of the state, if given)."""
    saved_tree = self.manager.item_metadata(step)["state"]
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    if only is not None:
      only = (only,) if isinstance(only, str) else only
      missing = [k for k in only if k not in saved_tree]
      if missing:
        raise ConfigError(
          f"The checkpoint {self.directory}/{step} has no {missing}; it holds {sorted(saved_tree)}."
        )
      saved_tree = {k: saved_tree[k] for k in only}
    saved = tree_shapes(saved_tree)
    wanted = tree_shapes(abstract)
    problems = [
      f"{k}: checkpoint {saved[k]}, model {wanted[k]}"
      for k in wanted
      if k in saved and saved[k] != wanted[k]
    ]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
    if only is None:
      problems += [f"{k}: in the checkpoint, not in the model" for k in saved if k not in wanted]
    if not problems:
      return
    saved_cfg = self.saved_config(step) or {}
    ours = ""
    if self.config is not None:
      ours = f"; this run has {_model_summary(json.loads(self.config.to_json()))}"
    raise ConfigError(
      f"The checkpoint {self.directory}/{step} is of another model: {len(problems)} array(s) "
      f"differ, e.g. {'; '.join(problems[:5])}. It was written with {_model_summary(saved_cfg)}"
      f"{ours}. Use the config that wrote it, or another --workdir."
    )

  def check_prediction(self, step: int) -> None:
    """Raises ConfigError if the checkpoint's network was trained to predict another quantity
    (objective, preconditioning, VP schedule) than this run's config would read its output as:
    the arrays fit, but every sample would be wrong."""
    saved_cfg = self.saved_config(step) if self.config is not None else None
    if saved_cfg is None:
      return
    theirs = _prediction(saved_cfg)
    ours = _prediction(json.loads(self.config.to_json()))
    # Only fields that apply to both (sigma_data means nothing without preconditioning).
    shared = sorted(set(theirs) & set(ours))
    differ = [
      f"diffusion.{k}={theirs[k]!r} in the checkpoint, {ours[k]!r} in this run"
      for k in shared
      if theirs[k] != ours[k]
    ]
    if differ:
      raise ConfigError(
        f"The checkpoint {self.directory}/{step} was trained to predict another quantity: "
        f"{'; '.join(differ)}. Its outputs would be misread; set these fields as they were in "
        "training (the checkpoint's config is saved beside it), or use another --workdir."
      )

  def _restore_data(self, step: int, iterator) -> None:
    """Sets the iterator to its saved position, also when another process count saved it.

    Each process saves its iterator state as `data/process_<i>-of-<n>.json`. Every process reads
    its block of the same global batches, so the states are equal and any of them will do for
    any process count; states that differ (e.g. other grain worker layouts) must match exactly.
    """
    folder = storage.path(self.directory) / str(step) / "data"
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


def place(params: Any, abstract: Any, what: str = "The imported weights") -> Any:
  """Puts host (numpy) arrays straight into the shardings of `abstract` (leaves with shape, dtype
  and sharding), each process building only its own shards.

  Raises:
    ConfigError: naming the arrays whose names or shapes differ from `abstract`'s.
  """
  have, want = tree_shapes(params), tree_shapes(abstract)
  problems = [
    f"{k}: {have[k]} vs the model's {want[k]}" for k in want if k in have and have[k] != want[k]
  ]
  problems += [f"{k}: missing" for k in want if k not in have]
  problems += [f"{k}: not in the model" for k in have if k not in want]
  if problems:
    raise ConfigError(
      f"{what} do not fit the model of this config: {len(problems)} array(s) differ, e.g. "
      f"{'; '.join(problems[:5])}. Check config.model against the weights."
    )

  def put(x, target):
    x = np.asarray(x, target.dtype)
    return jax.make_array_from_callback(x.shape, target.sharding, lambda index: x[index])

  return jax.tree.map(put, params, abstract)


def _key(entry) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (dataclass fields), SequenceKey.
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/blocks/mlp/fc1/kernel": shape, ...} for dicts and dataclasses alike."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(map(_key, path)): tuple(getattr(x, "shape", ())) for path, x in flat}


def _prediction(config: dict) -> dict:
  """The diffusion fields that fix what a network's output means (a checkpoint written before
  `preconditioning` existed had none)."""
  d = config.get("diffusion", {})
  out = {"objective": d.get("objective"), "preconditioning": d.get("preconditioning", "none")}
  if out["preconditioning"] != "none":
    out["sigma_data"] = d.get("sigma_data")
  if out["objective"] != "rectified_flow":
    out["schedule"] = d.get("schedule")
    out["num_timesteps"] = d.get("num_timesteps")
  return out


def _model_summary(config: dict) -> str:
  model, data = config.get("model", {}), config.get("data", {})
  return (
    f"model.name={model.get('name')!r} model.variant={model.get('variant')!r} "
    f"model.learn_sigma={model.get('learn_sigma')!r} model.num_classes="
    f"{model.get('num_classes')!r} data.image_size={data.get('image_size')!r} "
    f"data.channels={data.get('channels')!r}"
  )


def log_restore(step: int, directory: str) -> None:
  if jax.process_index() == 0:
    logging.info("Restored checkpoint %d from %s.", step, directory)
