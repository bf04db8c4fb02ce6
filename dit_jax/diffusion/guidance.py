"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a conditional network."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
  """uncond + scale * (cond - uncond), written so that scale = 1 returns `cond` exactly."""
  return cond + (scale - 1.0) * (cond - uncond)


def guided(
  apply: Callable[[jax.Array, jax.Array, Any], jax.Array],
  cond: Any,
  null_cond: Any,
  scale: float,
  guided_channels: int,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns denoise(z, t) that guides apply(z, t, cond) away from apply(z, t, null_cond).

  `cond` and `null_cond` are pytrees of arrays with a leading batch axis (class labels, text
  embeddings). The conditional and unconditional passes share one batched call. Only the first
  `guided_channels` output channels (the mean prediction) are guided; any further channels (a
  learned variance) come from the conditional pass.
  """
  if scale == 1.0:
    return lambda z, t: apply(z, t, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

  def denoise(z, t):
    b = z.shape[0]
    out = apply(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both)
    cond, uncond = out[:b], out[b:]
    mean = classifier_free_guidance(
      cond[..., :guided_channels], uncond[..., :guided_channels], scale
    )
    return jnp.concatenate([mean, cond[..., guided_channels:]], axis=-1)

  return denoise
