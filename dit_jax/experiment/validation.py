"""The validation loss: the training loss on held-out data at fixed times and fixed noise.

SD3 (Esser et al. 2024, §5) reports that this loss, on held-out examples at a fixed set of
timesteps, tracks sample quality (GenEval, human preference) across model sizes. Here:

- the examples are the first `eval.val_examples` elements, spread evenly, of the data config
  with `eval.val_split` (and `eval.val_path`) in place of the training split;
- each is noised at `eval.val_timesteps` unit times evenly spaced over [0, 1] (mapped onto the
  schedule as training maps the sampler's times, without the training shift), with noise drawn
  from (eval.val_seed, example index, time index) alone, and its conditioning as stored (no
  dropout);
- the loss is the training objective's per-example loss (weighting and learned-variance term
  included), of the parameters being trained;
- examples run in chunks of `eval.val_device_batch` per data-parallel device (the last chunk
  padded by repeating examples, which are left out), so every device runs the same program on
  the same shapes whatever the device count, and the per-example losses are averaged on the host
  in one order: the figure is the same bits on 1 or 8 devices and after a resume.

Logged as `val_loss` (the mean over times) and `val_loss_t<t>` per time.
"""

import concurrent.futures
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dit_jax import data, parallel
from dit_jax.conditioning import split_batch
from dit_jax.errors import ConfigError, check_numbers
from dit_jax.models.classifier import Classifier

NUMBERS = (
  ("train.val_every", ">= 0", " (0 = off)"),
  ("eval.val_examples", ">= 0", " (0 = the whole split)"),
  ("eval.val_timesteps", "> 0", ""),
  ("eval.val_seed", "in [0, 2**32)", ""),
  ("eval.val_device_batch", "> 0", " (examples per device per call)"),
)
# The held-out split of each data source that has one ("" = the config must name it).
DEFAULT_SPLITS = {"digits": "held_out", "shapes": "held_out"}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for a validation field that cannot work."""
  check_numbers(config, NUMBERS)
  if config.train.val_every and config.model.name == "classifier":
    raise ConfigError(
      "config.train.val_every applies to diffusion models; a classifier's held-out accuracy "
      "is `python -m dit_jax.evaluation.noisy_accuracy`. Set config.train.val_every=0."
    )


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose data is the validation split."""
  d = config.data
  split = config.eval.val_split or DEFAULT_SPLITS.get(d.name, "")
  if not split and d.name.startswith("tfds:"):
    split = "validation"
  if not split and not config.eval.val_path:
    raise ConfigError(
      f"config.train.val_every={config.train.val_every} needs held-out data, and "
      f"config.data.name={d.name!r} has no default split for it: set config.eval.val_path to "
      "the held-out data's directory (folder, latents) or config.eval.val_split."
    )
  val = config.copy_and_resolve_references()
  with val.unlocked():
    if split:
      val.data.split = split
    if config.eval.val_path:
      val.data.path = config.eval.val_path
  return val


def unit_times(count: int) -> np.ndarray:
  """`count` unit times evenly spaced over [0, 1] (0 = data, 1 = pure noise); one: 0.5."""
  return np.linspace(0.0, 1.0, count) if count > 1 else np.array([0.5])


@dataclasses.dataclass
class Validation:
  """The validation examples on the host and the jitted per-example loss; call it with the
  parameters (sharded as the train state's) to get the logged figures."""

  examples: dict[str, np.ndarray]  # image [N, H, W, C] and the conditioning, in order
  times: np.ndarray  # unit times [K]
  chunk: int  # examples per call, over all devices
  losses_fn: object  # jitted (params, batch, indices [B]) -> losses [B, K]
  mesh: jax.sharding.Mesh

  def losses(self, params) -> np.ndarray:
    """Per-example losses float32 [N, K], on every process."""
    n = len(self.examples["image"])
    sharding = parallel.batch_sharding(self.mesh)
    out = []
    for begin in range(0, n, self.chunk):
      index = np.arange(begin, begin + self.chunk) % n  # The last chunk wraps around.
      batch = {k: parallel.from_host(v[index], sharding) for k, v in self.examples.items()}
      ids = parallel.from_host(index.astype(np.int32), sharding)
      rows = self.losses_fn(params, batch, ids)
      rows = multihost_utils.process_allgather(rows, tiled=True)
      out.append(np.asarray(rows)[: min(self.chunk, n - begin)])
    return np.concatenate(out)

  def __call__(self, params) -> dict[str, float]:
    per_time = self.losses(params).astype(np.float64).mean(axis=0)  # [K]
    scores = {"val_loss": float(per_time.mean())}
    for t, value in zip(self.times, per_time, strict=True):
      scores[f"val_loss_t{t:.3f}"] = float(value)
    return scores


def _examples(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  try:
    source = data.build_source(data_config(config), num_classes=config.model.num_classes)
  except ConfigError as e:
    # Its message names config.data; here the data config is the validation one.
    raise ConfigError(
      f"The validation data (config.eval.val_split={config.eval.val_split!r}, "
      f"val_path={config.eval.val_path!r}, over config.data): {e}"
    ) from None
  n = len(source)
  if n == 0:
    raise ConfigError(
      f"The validation split ({config.eval.val_split or 'the default'}"
      f"{', ' + config.eval.val_path if config.eval.val_path else ''}) is empty; point "
      "config.eval.val_split / val_path to held-out data."
    )
  count = min(config.eval.val_examples or n, n)
  indices = np.linspace(0, n, count, endpoint=False).astype(np.int64)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    elements = list(pool.map(lambda i: source[int(i)], indices))
  keys = ("image", "label") if config.model.name == "dit" else ("image", "context", "pooled")
  out = {}
  for key in keys:
    if key not in elements[0]:
      raise ConfigError(
        f"The validation data has no {key!r} for config.model.name={config.model.name!r}; "
        "give it the same kind of data as training (config.eval.val_split / val_path)."
      )
    out[key] = np.stack([np.asarray(e[key]) for e in elements])
  out["image"] = out["image"].astype(np.float32)
  return out


def build(exp) -> Validation:
  """The validation loss of experiment `exp` (`dit_jax.experiment.Experiment`), its examples
  read now (a bad or empty split stops the run before training)."""
  config = exp.config
  if isinstance(exp.model, Classifier):
    raise ConfigError("The validation loss applies to diffusion models, not to a classifier.")
  examples = _examples(config)
  want = exp.config.data
  shape = examples["image"].shape[1:]
  if shape != (want.image_size, want.image_size, want.channels):
    raise ConfigError(
      f"The validation images are {shape}, but the model trains on "
      f"{(want.image_size, want.image_size, want.channels)}; give config.eval.val_path data of "
      "the training resolution."
    )
  times = unit_times(config.eval.val_timesteps)
  model, diffusion, seed = exp.model, exp.diffusion, config.eval.val_seed
  key = jax.random.key(seed)
  schedule_times = [diffusion.schedule.from_unit(jnp.float32(u)) for u in times]

  def losses_fn(params, batch, index):
    x0, cond = split_batch(batch)

    def denoise(z, t):
      return model.apply({"params": params}, z, t, cond)

    def noise(i, k):
      return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k), x0.shape[1:])

    columns = []
    for k, t in enumerate(schedule_times):
      eps = jax.vmap(lambda i, k=k: noise(i, k))(index)  # [B, H, W, C]
      t_batch = jnp.broadcast_to(t, (x0.shape[0],))
      loss, _ = diffusion.loss_at(denoise, x0, t_batch, eps)
      columns.append(loss)
    return jnp.stack(columns, axis=1)  # [B, K]

  batch = parallel.batch_sharding(exp.mesh)
  jitted = jax.jit(losses_fn, in_shardings=(exp.param_shardings, batch, batch), out_shardings=batch)
  chunk = config.eval.val_device_batch * parallel.data_parallel_size(exp.mesh)
  return Validation(examples, times, chunk, jitted, exp.mesh)
