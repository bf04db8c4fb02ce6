"""A noise-aware classifier p(y | z_t, t) for classifier guidance (ADM, Dhariwal & Nichol 2021).

A DiT-style encoder: the same patch embedding, fixed sin-cos positions, timestep embedder and
adaLN-Zero blocks as `dit_jax.models.dit.DiT` (so the same logical axes and sharding presets
apply), conditioned on the time alone; then a layer norm, a mean over the tokens and a dense head
to the class logits. It is trained by the same trainer (`model.name="classifier"`), with the
cross-entropy at times drawn by the configured timestep sampler
(`dit_jax.diffusion.Diffusion.classifier_loss`). Labels are its targets, never an input: the
conditioning dict it is called with is ignored.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax import axes
from dit_jax.models import layers
from dit_jax.models.dit import DiTBlock
from dit_jax.models.layers import constrain, dense


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Static hyper-parameters of a classifier; built from the config by `build_model`."""

  input_size: int
  in_channels: int
  patch: int
  width: int
  depth: int
  heads: int
  num_classes: int
  mlp_ratio: float = 4.0
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1
  attention: str = "xla"


class Classifier(nn.Module):
  """Class logits [B, num_classes] (float32) of noisy inputs z [B, H, W, C] at model times t [B].

  Precision as in `DiT`: the residual stream, the pooled features and the head stay float32.
  """

  config: ClassifierConfig

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, cond: dict[str, jax.Array] | None = None
  ) -> jax.Array:
    """`cond` (e.g. {"label": ...}) is accepted for the trainer's common call and ignored."""
    del cond
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, c = x.shape
    p = cfg.patch
    assert (h, w, c) == (cfg.input_size, cfg.input_size, cfg.in_channels), (x.shape, cfg)
    assert t.shape == (b,), t.shape
    gh, gw = h // p, w // p

    tokens = layers.patch_embed(x, p, cfg.width, dtype)  # [B, L, D]
    pos = layers.sincos_2d(cfg.width, gh, gw)  # [L, D], fixed
    tokens = constrain(tokens + jnp.asarray(pos, jnp.float32)[None], axes.TOKENS)  # [B, L, D]
    t_emb = layers.TimestepEmbedder(cfg.width, dtype, name="t_embedder")(t)  # [B, D]

    blocks = layers.scanned(DiTBlock, cfg.depth, cfg.scan_unroll, cfg.remat)(
      width=cfg.width,
      heads=cfg.heads,
      mlp_ratio=cfg.mlp_ratio,
      conditioning="adaln_zero",
      dtype=dtype,
      attention=cfg.attention,
      name="blocks",
    )
    tokens, _ = blocks(tokens, t_emb)  # [B, L, D]

    tokens = layers.layer_norm(True, jnp.float32, name="norm")(tokens.astype(jnp.float32))
    pooled = constrain(jnp.mean(tokens, axis=1), (axes.BATCH, axes.EMBED))  # [B, D]
    logits = dense(
      cfg.num_classes, (axes.EMBED, axes.VOCAB), jnp.float32, kernel_init=layers.zeros, name="head"
    )(pooled)
    return logits.astype(jnp.float32)  # [B, K]


def log_prob_grad(
  apply_fn: Callable[[jax.Array, jax.Array], jax.Array],
  z: jax.Array,
  t_model: jax.Array,
  labels: jax.Array,
) -> jax.Array:
  """d/dz log p(labels | z, t) per example, float32 of z's shape [B, H, W, C].

  `apply_fn(z, t_model) -> logits [B, K]` closes over the classifier's parameters (e.g.
  `lambda z, t: model.apply({"params": p}, z, t)`). The gradient of the batch's summed log
  probabilities gives each row its own gradient, since row i's logits depend on z[i] only.
  """
  assert z.shape[:1] == t_model.shape == labels.shape, (z.shape, t_model.shape, labels.shape)

  def total(z):
    logp = jax.nn.log_softmax(apply_fn(z, t_model).astype(jnp.float32), axis=-1)  # [B, K]
    return jnp.sum(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))

  return jax.grad(total)(z.astype(jnp.float32))
