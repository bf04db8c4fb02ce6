"""Post-hoc EMA (EDM2): the EMA of any relative std sigma_rel, chosen after training.

  python -m dit_jax.main --config=configs/quickstart.py --workdir=RUN \\
      --config.train.ema.kind=power --config.train.ema.std="(0.05,0.1)" \\
      --config.train.ema.snapshot_every=500
  python -m dit_jax.tools.posthoc_ema --workdir=RUN --std=0.07 --out=OUT
  python -m dit_jax.main --config=configs/quickstart.py --workdir=OUT --mode=sample  # + same flags

The run's power EMAs, saved every snapshot_every steps in RUN/ema_snapshots, are each a weighted
average of the parameters over training; a linear combination of them approximates the
power-function EMA of any other sigma_rel (dit_jax.experiment.ema explains the least squares). OUT
becomes a weights-only workdir (like an import): sample or evaluate it with the run's config, on
any mesh, or fine-tune from it with --config.train.init_from=OUT. The reconstruction ends at the
newest snapshot, or at --step=N (a snapshot step, using the snapshots up to it).
--std=0.03,0.05,0.07 writes one workdir per value, OUT/0.03, OUT/0.05, OUT/0.07, reading each
snapshot once. OUT/posthoc_ema.json (per workdir) records the weights and the fit's error.

Device memory: one copy of the parameters per output plus the EMAs of one snapshot.
"""

import ast
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from dit_jax import checkpoint, cli, config_defaults, storage, utils
from dit_jax.errors import ConfigError
from dit_jax.experiment import ema as ema_lib


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that tests can import this module."""
  flags.DEFINE_string("workdir", None, "A training run with power-EMA snapshots.")
  flags.DEFINE_string("std", None, "sigma_rel to reconstruct, or several separated by commas.")
  flags.DEFINE_string("out", None, "A new workdir for the result (OUT/<std> for several).")
  flags.DEFINE_integer("step", None, "The snapshot step the EMA ends at (default: the newest).")
  flags.DEFINE_bool(
    "evaluate",
    False,
    "Also score each reconstruction as --mode=evaluate does (the run's config, its sampling and "
    "eval settings) and print a table of the scores against sigma_rel; writes OUT/sweep.json and "
    "OUT/sweep.png.",
  )
  flags.DEFINE_multi_string(
    "set",
    [],
    "With --evaluate: a sampling or evaluation setting to score under instead of the run's own, "
    "as sample.<field>=<value> or eval.<field>=<value> (repeatable), e.g. "
    "--set=sample.guidance_scale=1.",
  )
  flags.mark_flags_as_required(["workdir", "std", "out"])


def parse_stds(text: str) -> list[float]:
  """`0.05` or `0.03,0.05` -> floats, each a valid sigma_rel; ConfigError otherwise."""
  try:
    stds = [float(part) for part in text.split(",") if part.strip()]
  except ValueError:
    stds = []
  if not stds:
    raise ConfigError(f"--std={text!r} is not a list of numbers; e.g. --std=0.07 or 0.05,0.07.")
  check_stds(stds)
  return stds


def check_stds(stds: Sequence[float]) -> None:
  """Raises ConfigError unless `stds` are distinct sigma_rel values in (0, MAX_STD]."""
  text = ",".join(f"{s:g}" for s in stds)
  if not stds:
    raise ConfigError("--std is empty; give one sigma_rel or several, e.g. --std=0.05,0.07.")
  for std in stds:
    if not (math.isfinite(std) and 0 < std <= ema_lib.MAX_STD):
      raise ConfigError(
        f"--std={text} holds {std}; each sigma_rel must be in (0, {ema_lib.MAX_STD:.5f}] "
        f"({ema_lib.MAX_STD:.5f} = the plain average of all steps)."
      )
  if len(set(stds)) != len(stds):
    raise ConfigError(f"--std={text} repeats a value; list each sigma_rel once.")


# The sections --set may change: how the sweep samples and scores, never what was trained.
_SETTABLE = ("sample", "eval")


def apply_settings(config: ml_collections.ConfigDict, settings: Sequence[str]) -> None:
  """Sets each `section.field=value` of `settings` (`--set`) on `config` in place, the value
  parsed by the field's type; ConfigError for another section, an unknown field or a bad value."""
  for item in settings:
    key, sep, text = item.partition("=")
    *path, name = key.split(".")
    node = config
    for part in path:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if (
      not sep
      or not path
      or path[0] not in _SETTABLE
      or not isinstance(node, ml_collections.ConfigDict)
      or name not in node
      or isinstance(node[name], ml_collections.ConfigDict)
    ):
      raise ConfigError(
        f"--set={item!r} names no sampling or evaluation setting; give "
        "sample.<field>=<value> or eval.<field>=<value> with a field of the config, e.g. "
        "--set=sample.guidance_scale=1."
      )
    current = node[name]
    try:
      if isinstance(current, (bool, int, float, str)):
        node[name] = config_defaults.parse_value(text, current)
      else:  # Tuples, e.g. sample.guidance_interval=(0.2,0.8).
        node[name] = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError) as e:
      raise ConfigError(
        f"--set={item!r}: {text!r} is not a value for {key} (now {current!r})."
      ) from e


def outputs(out: str, stds: Sequence[float]) -> list[str]:
  """The workdir of each std: `out` itself for one, `out/<std>` for several."""
  if len(stds) == 1:
    return [out]
  return [storage.join(out, f"{std:g}") for std in stds]


def _snapshot_config(saved: dict) -> ml_collections.ConfigDict:
  """The run's config as its snapshot saved it, over today's defaults (for fields added since)."""
  config = config_defaults.base_config()
  config.update(saved)
  return config


def reconstruct(
  workdir: str, stds: Sequence[float], out: str, step: int | None = None, devices=None
) -> list[str]:
  """Writes the post-hoc EMA of each sigma_rel in `stds` to a new workdir; returns their paths.

  Raises:
    ConfigError: if `workdir` holds no snapshots, `step` is not one of them, a std lies outside
      the range the snapshots reconstruct (the message gives it), or an output holds
      checkpoints. Everything is checked before anything is written.
  """
  from dit_jax import experiment  # Here: building the model is not needed to check the input.

  check_stds(stds)
  directory = storage.join(storage.resolve(workdir), checkpoint.SNAPSHOTS)
  snaps = checkpoint.EmaSnapshots(workdir, read_only=True) if storage.isdir(directory) else None
  steps = snaps.all_steps() if snaps is not None else []
  if not steps:
    raise ConfigError(
      f"{directory} holds no EMA snapshots; train with --config.train.ema.kind=power and "
      "--config.train.ema.snapshot_every=N (> 0) to write them."
    )
  try:
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(
        f"--step={step} is not a snapshot step; {directory} has snapshots at {steps}."
      )
    used = [s for s in steps if s <= step]
    profiles = {s: snaps.profiles(s) for s in used}
    times = [s for s in used for _ in profiles[s]["gamma"]]
    exps = [g for s in used for g in profiles[s]["gamma"]]
    gammas = [ema_lib.std_to_gamma(std) for std in stds]
    weights, errors = ema_lib.posthoc_weights(times, exps, step, gammas)  # [N, K], [K]
    bad = [std for std, err in zip(stds, errors, strict=True) if err > ema_lib.MAX_RESIDUAL]
    if bad:
      span = ema_lib.reconstructable_range(times, exps, step)
      can = "none" if span is None else f"sigma_rel in [{span[0]:.3g}, {span[1]:.3g}]"
      raise ConfigError(
        f"--std={','.join(f'{s:g}' for s in bad)} cannot be reconstructed from the {len(used)} "
        f"snapshot(s) up to step {step} in {directory} (relative error above "
        f"{ema_lib.MAX_RESIDUAL:g}); they reconstruct {can}. Pick a std in that range, or "
        "train with more snapshots (a smaller train.ema.snapshot_every) or other train.ema.std."
      )
    targets = outputs(out, stds)
    for target in targets:
      checkpoint.check_new_workdir(target)
    config = _snapshot_config(snaps.saved_config(step))
    exp = experiment.build(config, devices=devices, training=False)
    abstract = exp.abstract_state.params

    @jax.jit
    def add(acc, w, tree):
      return jax.tree.map(lambda a, x: a + w * x, acc, tree)

    def zeros():
      return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), abstract)

    acc = [zeros() for _ in stds]
    row = 0
    with exp.context():
      for s in used:
        emas = snaps.restore(s, abstract)
        for tree in emas:
          acc = [add(a, np.float32(weights[row, k]), tree) for k, a in enumerate(acc)]
          row += 1
        del emas
  finally:
    if snaps is not None:
      snaps.close()
  for k, (std, target) in enumerate(zip(stds, targets, strict=True)):
    source = (
      f"posthoc_ema sigma_rel={std:g} (gamma={gammas[k]:.4g}) from {len(used)} snapshot(s) up to "
      f"step {step} of {storage.resolve(workdir)}"
    )
    path = checkpoint.save_weights(target, step, acc[k], config, source=source)
    if jax.process_index() == 0:
      record = {
        "std": std,
        "gamma": gammas[k],
        "step": step,
        "relative_error": float(errors[k]),
        "snapshots": [
          {"step": t, "gamma": g, "weight": float(w)}
          for t, g, w in zip(times, exps, weights[:, k], strict=True)
        ],
        "source": storage.resolve(workdir),
      }
      storage.write_json(storage.join(target, "posthoc_ema.json"), record, indent=1)
      logging.info(
        "sigma_rel=%g: weights over %d stored EMAs (sum %.4f, relative profile error %.2g) "
        "written to %s.",
        std,
        len(times),
        float(weights[:, k].sum()),
        float(errors[k]),
        path,
      )
  return targets


# The scores a sweep plots, the first present of each group: sample quality, then class fidelity.
_PLOTTED = (("fid", "frechet_distance"), ("class_accuracy", "accuracy"))


def sweep(
  workdir: str,
  stds: Sequence[float],
  out: str,
  step: int | None = None,
  settings: Sequence[str] = (),
) -> list[dict]:
  """Reconstructs each sigma_rel (see `reconstruct`), scores each with `--mode=evaluate`'s
  evaluation under the run's own config (with `settings` applied, see `apply_settings`), and
  writes OUT/sweep.json (one row per sigma_rel) and
  OUT/sweep.png (the plotted scores against sigma_rel); returns the rows."""
  from dit_jax.evaluation import runner

  stds = sorted(stds)
  apply_settings(config_defaults.base_config(), settings)  # Bad --set fails before any work.
  targets = reconstruct(workdir, stds, out, step)
  if len(stds) == 1:  # `reconstruct` wrote OUT itself; keep the sweep's files beside it.
    out = targets[0]
  snaps = checkpoint.EmaSnapshots(workdir, read_only=True)
  try:
    step = snaps.all_steps()[-1] if step is None else step
    config = _snapshot_config(snaps.saved_config(step))  # The config the run trained with.
  finally:
    snaps.close()
  config.eval.name = "posthoc"
  apply_settings(config, settings)
  rows = []
  for std, target in zip(stds, targets, strict=True):
    scores = runner.evaluate(config, target, overwrite=True)
    rows.append({"std": std, "workdir": target, **scores})
  if jax.process_index() == 0:
    storage.write_json(storage.join(out, "sweep.json"), rows)
    keys = [next((k for k in group if k in rows[0]), None) for group in _PLOTTED]
    keys = [k for k in keys if k is not None]
    utils.line_plot(
      storage.join(out, "sweep.png"),
      [r["std"] for r in rows],
      {k: [r[k] for r in rows] for k in keys},
      x_label="sigma_rel",
    )
    width = max(len(k) for k in keys)
    print(f"{'sigma_rel':>9}  " + "  ".join(f"{k:>{width}}" for k in keys))
    for r in rows:
      print(f"{r['std']:>9.3g}  " + "  ".join(f"{r[k]:>{width}.4g}" for k in keys))
  return rows


def main(argv):
  del argv
  utils.quiet_library_logs()
  f = flags.FLAGS
  storage.check_reachable(f.workdir, f.out)
  stds = parse_stds(f.std)
  if f.evaluate:
    sweep(f.workdir, stds, f.out, f.step, f.set)
  elif f.set:
    raise ConfigError("--set changes how --evaluate scores; add --evaluate, or drop --set.")
  else:
    reconstruct(f.workdir, stds, f.out, f.step)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
