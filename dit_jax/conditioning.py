"""What a batch conditions the model on, and how that conditioning is dropped for guidance.

A batch is `{"image": [B, H, W, C], **conditioning}`; the model is called as
`model.apply(params, z, t, conditioning)`. Two kinds:

- labels (DiT): `{"label": int32 [B]}`; the null label is `num_classes`.
- text (MMDiT): `{"context": [B, L, Dc], "pooled": [B, Dp]}`; the null input is the encoding of the
  empty caption, per text encoder (`dit_jax.data.text.TextSpec`).

Training replaces each example's conditioning by the null one with the configured probability
(text: independently per encoder, as SD3 does), so that the same network also learns the
unconditional model that classifier-free guidance needs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax.data.text import TextSpec
from dit_jax.errors import ConfigError

Cond = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LabelConditioner:
  """Class labels with a null class for guidance."""

  num_classes: int
  dropout: float

  keys = ("label",)

  def shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"label": jax.ShapeDtypeStruct((batch,), jnp.int32)}

  def drop(self, cond: Cond, key: jax.Array) -> Cond:
    """Replaces each label by the null class with probability `dropout`."""
    labels = cond["label"]
    if self.dropout <= 0:
      return cond
    dropped = jax.random.bernoulli(key, self.dropout, labels.shape)
    return {"label": jnp.where(dropped, self.num_classes, labels)}

  def null(self, cond: Cond) -> Cond:
    return {"label": jnp.full_like(cond["label"], self.num_classes)}


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner:
  """Precomputed text embeddings; each encoder's part is dropped independently, to the empty
  caption's encoding (`replace_with="empty"`) or to zeros ("zeros")."""

  spec: TextSpec
  dropout: float
  replace_with: str = "empty"

  keys = ("context", "pooled")

  def shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = self.spec
    return {
      "context": jax.ShapeDtypeStruct((batch, s.context_len, s.context_dim), jnp.float32),
      "pooled": jax.ShapeDtypeStruct((batch, s.pooled_dim), jnp.float32),
    }

  def _masks(self, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From keep [B, E] (per example and encoder), the masks of the context [B, L, Dc] and the
    pooled vector [B, Dp] that are True where the example's own encoding stays."""
    s = self.spec
    b = keep.shape[0]
    ctx = jnp.ones((b, s.context_len, s.context_dim), bool)
    pooled = jnp.ones((b, s.pooled_dim), bool)
    for e, slot in enumerate(self.spec.encoders):
      rows = np.zeros((s.context_len, 1), bool)
      rows[slot.seq[0] : slot.seq[1]] = True
      cols = np.zeros((1, s.context_dim), bool)
      cols[:, slot.context_channels[0] : slot.context_channels[1]] = True
      pooled_cols = np.zeros((s.pooled_dim,), bool)
      pooled_cols[slot.pooled_channels[0] : slot.pooled_channels[1]] = True
      k = keep[:, e]
      ctx = ctx & (k[:, None, None] | ~(rows & cols)[None])
      pooled = pooled & (k[:, None] | ~pooled_cols[None])
    return ctx, pooled

  def drop(self, cond: Cond, key: jax.Array) -> Cond:
    """Replaces each encoder's part of each example, with probability `dropout` and
    independently of the other encoders, by the empty caption's encoding or by zeros."""
    if self.dropout <= 0:
      return cond
    b = cond["pooled"].shape[0]
    keep = ~jax.random.bernoulli(key, self.dropout, (b, len(self.spec.encoders)))
    ctx_mask, pooled_mask = self._masks(keep)
    null = self.null(cond)
    if self.replace_with == "zeros":
      null = jax.tree.map(jnp.zeros_like, null)
    return {
      "context": jnp.where(ctx_mask, cond["context"], null["context"]),
      "pooled": jnp.where(pooled_mask, cond["pooled"], null["pooled"]),
    }

  def null(self, cond: Cond) -> Cond:
    b = cond["pooled"].shape[0]
    s = self.spec
    return {
      "context": jnp.broadcast_to(jnp.asarray(s.null_context), (b, s.context_len, s.context_dim)),
      "pooled": jnp.broadcast_to(jnp.asarray(s.null_pooled), (b, s.pooled_dim)),
    }


Conditioner = LabelConditioner | TextConditioner


def split_batch(batch: dict[str, jax.Array]) -> tuple[jax.Array, Cond]:
  """(images, conditioning) of a batch."""
  return batch["image"], {k: v for k, v in batch.items() if k != "image"}


def build_conditioner(config: ml_collections.ConfigDict, text_spec: TextSpec | None) -> Conditioner:
  """The conditioner of `config.model.name`; MMDiT needs the data's `text_spec`. (The dropout
  rates are checked with every other number by `dit_jax.checks.validate`.)"""
  m = config.model
  if m.name == "dit":
    return LabelConditioner(m.num_classes, m.class_dropout)
  if text_spec is None:
    raise ConfigError(
      f"config.model.name={m.name!r} needs text-conditioned data, but config.data.name="
      f"{config.data.name!r} has no text; use 'shapes', 'synthetic' or 'latents' with text "
      "embeddings."
    )
  return TextConditioner(text_spec, m.text_dropout, m.text_dropout_to)
