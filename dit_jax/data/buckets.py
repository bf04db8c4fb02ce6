"""Aspect-ratio buckets: `config.data.buckets`, and global batches that each hold one bucket.

`config.data.buckets` lists image sizes "HxW" (in the data's units: pixels for pixel data,
latent cells for latents), e.g. "16x16,12x20". Each element of the data belongs to one bucket and
is read at its size; every global batch is drawn from a single bucket, so its images share one
shape (and, for buckets of about equal area, about the same number of tokens), and the train step
compiles once per bucket.

The order of batches is a function of the seed alone: in epoch e, each bucket's elements are
shuffled by `np.random.default_rng([seed, e])`, cut into whole global batches (a remainder
smaller than a batch waits for a later epoch's shuffle), and the batches of all buckets are
shuffled together. Batch k is thus fixed for any number of processes; process p reads its block
of rows of it, and an iterator's position (the next k) is all a checkpoint needs.
"""

import functools

import numpy as np

from dit_jax.errors import ConfigError

# SDXL's buckets around 1024^2 pixels (a subset of its training list, each side a multiple of 64),
# as (height, width).
SDXL_1024 = (
  (1024, 1024),
  (896, 1152),
  (1152, 896),
  (832, 1216),
  (1216, 832),
  (768, 1344),
  (1344, 768),
  (640, 1536),
  (1536, 640),
)


def parse(spec: str, what: str = "config.data.buckets") -> tuple[tuple[int, int], ...]:
  """ "16x16,12x20" -> ((16, 16), (12, 20)); "" -> ().

  Raises:
    ConfigError: for a size that is not "HxW" with positive integers, or one given twice.
  """
  sizes = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    h, sep, w = part.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
      raise ConfigError(
        f"{what}={spec!r}: {part!r} is not a size HxW with positive integers; "
        "write e.g. '16x16,12x20'."
      )
    if (int(h), int(w)) in sizes:
      raise ConfigError(f"{what}={spec!r} lists {part!r} twice; list it once.")
    sizes.append((int(h), int(w)))
  return tuple(sizes)


def format_sizes(sizes) -> str:
  """((16, 16), (12, 20)) -> "16x16,12x20"."""
  return ",".join(f"{h}x{w}" for h, w in sizes)


def scaled(sizes, factor: int) -> tuple[tuple[int, int], ...]:
  """Pixel sizes divided by a VAE's downsampling factor (e.g. SDXL_1024 in latent cells)."""
  return tuple((h // factor, w // factor) for h, w in sizes)


def check(sizes, patch: int, what: str = "config.data.buckets") -> None:
  """Raises a ConfigError if a bucket's sides are not multiples of the patch."""
  for h, w in sizes:
    if h % patch or w % patch:
      raise ConfigError(
        f"{what}: the bucket {h}x{w} does not divide into patches of {patch}; use sizes whose "
        f"height and width are multiples of {patch}."
      )


def nearest(height: int, width: int, sizes) -> int:
  """The index of the bucket whose aspect ratio is nearest (in log ratio) to height / width."""
  target = np.log(height / width)
  return int(np.argmin([abs(np.log(h / w) - target) for h, w in sizes]))


class BucketBatches:
  """Global batch k -> (bucket, the element indices of its rows [global_batch]); see the module
  docstring for the order. Infinite: batch k belongs to epoch k // batches_per_epoch."""

  def __init__(self, bucket_of: np.ndarray, num_buckets: int, global_batch: int, seed: int):
    bucket_of = np.asarray(bucket_of, np.int64)
    self._members = [np.flatnonzero(bucket_of == b) for b in range(num_buckets)]
    self._global_batch, self._seed = global_batch, seed
    self.counts = [len(m) for m in self._members]
    self.batches_per_epoch = sum(n // global_batch for n in self.counts)
    if not self.batches_per_epoch:
      raise ConfigError(
        f"No bucket of config.data.buckets holds a whole global batch of {global_batch} "
        f"(elements per bucket: {self.counts}); lower config.train.batch_size or use more data."
      )

  @functools.lru_cache(maxsize=2)  # noqa: B019 (one object per iterator; two epochs in flight)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self._seed, epoch])
    rows, buckets = [], []
    for b, members in enumerate(self._members):
      n = len(members) // self._global_batch
      chosen = rng.permutation(members)[: n * self._global_batch]
      rows.append(chosen.reshape(n, self._global_batch))
      buckets.append(np.full(n, b, np.int64))
    order = rng.permutation(self.batches_per_epoch)
    return np.concatenate(rows)[order], np.concatenate(buckets)[order]

  def __call__(self, k: int) -> tuple[int, np.ndarray]:
    epoch, j = divmod(int(k), self.batches_per_epoch)
    rows, buckets = self._epoch(epoch)
    return int(buckets[j]), rows[j]
