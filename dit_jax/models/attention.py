"""Scaled dot-product attention by implementation (`config.model.attention`).

- "xla": `jax.nn.dot_product_attention`'s XLA formulation; every platform.
- "cudnn": cuDNN's fused (flash) attention through the same function; NVIDIA GPUs. It computes in
  bfloat16 (float32 inputs are cast down and the output back up).
- "splash": the Pallas splash-attention kernel of `jax.experimental.pallas.ops.tpu`; TPUs. A Pallas
  call cannot be partitioned by the compiler, so it runs under `jax.shard_map` over the mesh set
  with `jax.set_mesh`: the batch and heads split as the logical-axis rules split them (a dimension
  the mesh does not divide stays whole), the tokens and per-head channels whole on each device.
  Sequences are padded to a multiple of the 128-token tile (tiles of 512, 256 or 128 tokens,
  the largest that divides the padded length) and the padding is kept out of the softmax by
  segment ids. Without a mesh the kernel runs on the arrays as they are (one device).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax import axes, config_defaults
from dit_jax.errors import ConfigError, check_choice

IMPLEMENTATIONS = config_defaults.ATTENTIONS
# The device platform each implementation needs (None: any).
PLATFORMS = {"xla": None, "cudnn": "gpu", "splash": "tpu"}

_LANES = 128  # The kernel's tiles are multiples of the TPU's 128 lanes.
_BLOCKS = (512, 256, 128)  # Tile sizes tried, largest first.


def check_platform(implementation: str, platform: str) -> None:
  """Raises a ConfigError unless `implementation` runs on devices of `platform` ("cpu", ...)."""
  check_choice(implementation, IMPLEMENTATIONS, "model.attention")
  needs = PLATFORMS[implementation]
  if needs is not None and platform != needs:
    raise ConfigError(
      f"config.model.attention={implementation!r} needs {needs.upper()} devices, but this "
      f"experiment runs on {platform.upper()}; use --config.model.attention=xla."
    )


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla", *, interpret: bool = False
) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head: q [B, Lq, H, Dh], k and v [B, Lk, H, Dh] ->
  [B, Lq, H, Dh], in q's dtype. `interpret` runs a Pallas kernel in interpret mode (tests)."""
  assert q.ndim == k.ndim == v.ndim == 4 and k.shape == v.shape, (q.shape, k.shape, v.shape)
  if implementation == "xla":
    return _xla(q, k, v)
  if implementation == "cudnn":
    return _cudnn(q, k, v)
  if implementation == "splash":
    return _splash(q, k, v, interpret)
  check_choice(implementation, IMPLEMENTATIONS, "model.attention")
  raise AssertionError(implementation)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The arithmetic of `jax.nn.dot_product_attention` (logits and softmax in float32, then scaled
  after the product), with the heads folded into the batch first: [B, L, H, Dh] -> [B * H, L, Dh].

  Batched matrix products whose one batch dimension leads run 1.3x faster forward and backward
  on XLA's CPU backend than the two-batch-dimension einsums on the [B, L, H, Dh] layout (DiT-S/2
  shapes), and give the same numbers.
  """
  b, lq, h, d = q.shape

  def fold(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)  # [B * H, L, Dh]

  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
  logits = jax.lax.dot_general(
    fold(q), fold(k), (((2,), (2,)), ((0,), (0,))), precision, logits_dtype
  )  # [B * H, Lq, Lk]
  logits = logits * jnp.asarray(1.0 / math.sqrt(d), logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  out = jax.lax.dot_general(probs, fold(v), (((2,), (1,)), ((0,), (0,))))  # [B * H, Lq, Dh]
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3).astype(q.dtype)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  # cuDNN's flash attention takes only 16-bit inputs.
  low = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  q16, k16, v16 = (x.astype(low) for x in (q, k, v))
  return jax.nn.dot_product_attention(q16, k16, v16, implementation="cudnn").astype(q.dtype)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash_local(q, k, v, interpret)
  # Batch and heads split as the model's activations are; each device sees whole sequences. A
  # dimension the mesh axes do not divide (the batch of 1 that initialization traces) is whole on
  # every device instead.
  names = nn.logical_to_mesh_axes((axes.BATCH, None, axes.HEADS, None))
  spec = jax.sharding.PartitionSpec(
    *(n if size % _shards(mesh, n) == 0 else None for n, size in zip(names, q.shape, strict=True))
  )
  local = functools.partial(_splash_local, interpret=interpret)
  # check_vma=False: the kernel's pallas_call does not declare how its outputs vary over the mesh.
  shard = jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return shard(q, k, v)


def _shards(mesh, names) -> int:
  if names is None:
    return 1
  return math.prod(mesh.shape[n] for n in ((names,) if isinstance(names, str) else names))


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
  """The kernel over one device's arrays; the kernel takes [H, L, Dh] and is mapped over B."""
  _, lq, h, dh = q.shape
  lk = k.shape[1]
  # The kernel does not scale the logits.
  q = q * jnp.asarray(1.0 / math.sqrt(dh), q.dtype)
  pq, pk = _padded(lq), _padded(lk)
  kernel = _kernel(h, pq, pk, interpret)

  def heads_major(x: jax.Array, padded: int) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)  # [B, H, L_padded, Dh]

  # Real tokens are segment 0 and padding segment 1: real queries never see padded keys, and a
  # padded query (its output dropped) sees only padded keys, so no row is empty.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  segments = sa.SegmentIds(q=_segments(lq, pq), kv=_segments(lk, pk))
  out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(
    heads_major(q, pq), heads_major(k, pk), heads_major(v, pk)
  )  # [B, H, Lq_padded, Dh]
  return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)  # [B, Lq, H, Dh]


def _padded(length: int) -> int:
  return -(-length // _LANES) * _LANES


def _segments(length: int, padded: int) -> jax.Array:
  return (jnp.arange(padded) >= length).astype(jnp.int32)


def _block(padded: int) -> int:
  return next(b for b in _BLOCKS if padded % b == 0)


def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  """Splash attention over [heads, q_len, Dh] with every query seeing every key."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  bq, bkv = _block(q_len), _block(kv_len)
  sizes = sa.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len))] * heads)
  return sa.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
