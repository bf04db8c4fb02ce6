"""Accuracy of a noise-aware classifier (`model.name="classifier"`) on real images at fixed noise
levels: how much class information its guidance gradient can carry at each stage of sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dit_jax import parallel
from dit_jax.experiment import Experiment

# Fractions of the schedule (unit time u: t = u for rectified flow, u * T steps for VP) at which
# --mode=evaluate reports the accuracy; 0 is the clean image.
UNIT_TIMES = (0.0, 0.25, 0.5, 0.75, 0.95)


def noisy_accuracy(
  exp: Experiment,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  seed: int,
  batch_size: int,
  unit_times: tuple[float, ...] = UNIT_TIMES,
) -> dict[str, float]:
  """{"accuracy_u<u>": fraction of `images` [N, H, W, C] classified as `labels` [N] after noising
  them to unit time u} for each u of `unit_times`, plus "sigma_u<u>" (the noise-to-signal ratio
  sigma / alpha there).

  The noise of image i depends on the seed and i only (not on the batch size nor the devices);
  the timestep shift of training is not applied, so u is a fraction of the schedule itself.
  """
  n = len(images)
  assert labels.shape == (n,), (images.shape, labels.shape)
  dp = parallel.data_parallel_size(exp.mesh)
  chunk = math.ceil(min(batch_size, n) / dp) * dp
  sharding = parallel.batch_sharding(exp.mesh)
  schedule = exp.diffusion.schedule
  key = jax.random.key(seed)

  def correct(params, x0, y, idx, u):
    t = schedule.from_unit(jnp.full(idx.shape, u, jnp.float32))
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x0.shape[1:]))(idx)
    alpha, sigma = exp.diffusion.alpha_sigma(t)
    logits = exp.model.apply({"params": params}, alpha * x0 + sigma * eps, schedule.model_time(t))
    return jnp.argmax(logits, axis=-1) == y  # [B]

  jitted = jax.jit(correct, in_shardings=(exp.param_shardings, sharding, sharding, sharding, None))

  def put(a: np.ndarray) -> jax.Array:
    return parallel.from_host(a, sharding)

  results = {}
  for u in unit_times:
    hits = 0
    for start in range(0, n, chunk):
      stop = min(start + chunk, n)
      pad = chunk - (stop - start)
      idx = np.arange(start, start + chunk, dtype=np.int32)
      x0 = np.concatenate([images[start:stop], np.repeat(images[:1], pad, axis=0)])
      y = np.concatenate([labels[start:stop], np.repeat(labels[:1], pad)]).astype(np.int32)
      with exp.context():
        ok = jitted(params, put(x0.astype(np.float32)), put(y), put(idx), u)
      ok = np.asarray(multihost_utils.process_allgather(ok, tiled=True))
      hits += int(ok[: stop - start].sum())
    t = schedule.from_unit(jnp.asarray([u], jnp.float32))
    alpha, sigma = (float(v[0]) for v in schedule.alpha_sigma(t))
    results[f"accuracy_u{u:g}"] = hits / n
    results[f"sigma_u{u:g}"] = sigma / alpha if alpha > 0 else math.inf
  return results
