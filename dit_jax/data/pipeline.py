"""The grain input pipeline: shuffled, repeated, sharded by process, batched, checkpointable.

The order of elements is a function of the seed alone: one global stream (shuffled anew each epoch,
flipped per position) is dealt out to processes round-robin, so the union of the processes' batches
at a step does not depend on how many processes there are.

Latents from `dit_jax.tools.encode_latents` may carry the posterior std and the latents of the
flipped images: each read of an element then draws z = mean + std * N(0, 1) and, with
config.data.random_flip, takes the flipped image's latent with probability 1/2, with randomness
that is a function of the seed and the position in the stream (so a resumed iterator repeats it).
"""

import functools
from concurrent import futures

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from dit_jax.data import buckets as buckets_lib
from dit_jax.data.sources import DataError, LatentsSource, build_source

# Each thread builds whole batches; a few in flight keep the accelerator fed without holding many
# large batches in memory.
_NUM_THREADS = 4
_PREFETCH_BATCHES = 8


def _random_flip(element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  if rng.random() < 0.5:
    return {**element, "image": element["image"][:, ::-1]}
  return element


def _draw_latent(
  element: dict[str, np.ndarray], rng: np.random.Generator, flip: bool
) -> dict[str, np.ndarray]:
  """Picks the flipped image's latent with probability 1/2 if `flip` and it is there, then draws
  from the posterior N(mean, std^2) if the std is there; drops the variants from the element."""
  element = dict(element)
  mean, std = element.pop("image"), element.pop("latent_std", None)
  flipped, flipped_std = element.pop("latent_flip", None), element.pop("latent_flip_std", None)
  if flip and flipped is not None and rng.random() < 0.5:
    mean, std = flipped, flipped_std
  if std is not None:
    mean = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
  return {**element, "image": mean}


def _ensure_flags_parsed() -> None:
  # grain 0.2.18 reads an absl flag in mp_prefetch and fails when no absl.app parsed the command
  # line (notebooks, pytest; grain issue #1355). Its default is the value we want anyway.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _iter_batches(dataset: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """A map dataset of batches read by threads, with `num_workers` > 0 worker processes."""
  iter_dataset = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=_NUM_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
  )
  if num_workers > 0:
    _ensure_flags_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_dataset


def build_train_iterator(
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  seed: int | None = None,
) -> grain.DatasetIterator:
  """Returns an endless iterator over this process's training batches.

  Batches are `{"image": np.float32 [batch_size, H, W, C], "label": np.int32 [batch_size]}`. The
  iterator's `get_state()` / `set_state()` resume the exact sequence of batches.

  Args:
    config: the full config; reads `config.data`, `config.model.num_classes`, `config.train.seed`.
    batch_size: examples per batch on this process (the global batch over `process_count`).
    process_index: this process's index; it reads its contiguous block of each global batch.
    process_count: the number of processes reading the data.
    seed: shuffle and flip seed; defaults to `config.train.seed`.

  Raises:
    DataError: on a bad batch size or process index, or data smaller than one global batch.
  """
  if batch_size <= 0:
    raise DataError(f"The per-process batch size is {batch_size}; it must be positive.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  bucketed = bool(config.data.buckets)
  source = build_source(config, num_classes=config.model.num_classes, bucketed=bucketed)
  global_batch = batch_size * process_count
  if bucketed:
    return _bucketed_iterator(config, source, batch_size, process_index, process_count, seed)
  if len(source) < global_batch:
    raise DataError(
      f"config.data.name={config.data.name!r} has {len(source)} examples, fewer than one global "
      f"batch of {global_batch} ({process_count} process(es) x {batch_size}); lower "
      "config.train.batch_size or use more data."
    )
  seed = config.train.seed if seed is None else seed
  flip = config.data.random_flip
  latent = isinstance(source, LatentsSource)
  draws = latent and (source.has_std or (flip and source.has_flip))
  if latent and flip and not source.has_flip:
    logging.log_first_n(
      logging.WARNING,
      "config.data.random_flip flips the latent tensors of %r, which is not the latent of the "
      "flipped image; encode the flipped images too with dit_jax.tools.encode_latents --flip.",
      1,
      config.data.path,
    )
  dataset = grain.MapDataset.source(source.training_view() if draws else source)
  dataset = dataset.seed(seed).shuffle().repeat(None)
  # Random maps come before sharding, so an element's flip and posterior draw depend on its
  # position in the global stream, not on the topology; each epoch draws afresh.
  if draws:
    dataset = dataset.random_map(functools.partial(_draw_latent, flip=flip))
  if flip and not (latent and source.has_flip):
    dataset = dataset.random_map(_random_flip)
  # Process p reads rows [p * batch_size, (p + 1) * batch_size) of every global batch, so the
  # global batch (processes' rows in order) is the same for any process count.
  dataset = dataset.batch(batch_size, drop_remainder=True)[process_index::process_count]
  iter_dataset = _iter_batches(dataset, config.data.num_workers)
  logging.info(
    "Train data: %d examples, batches of %d on process %d of %d, seed %d, %d worker processes.",
    len(source),
    batch_size,
    process_index,
    process_count,
    seed,
    config.data.num_workers,
  )
  return iter(iter_dataset)


class _BucketRows:
  """Global batch k -> this process's rows of it, read and stacked (`buckets.BucketBatches`);
  element i's flip (and, for latents, posterior draw) comes from (seed, k, its row in the global
  batch), like the global stream's draws a function of the position alone."""

  def __init__(self, source, batches, batch_size, process_index, seed, flip):
    self._batches = batches
    self._rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    self._first_row, self._seed, self._flip = process_index * batch_size, seed, flip
    latent = isinstance(source, LatentsSource)
    self._draws = latent and (source.has_std or (flip and source.has_flip))
    self._source = source.training_view() if self._draws else source
    self._flip_tensor = flip and not (latent and source.has_flip)

  def __call__(self, k: int, _) -> dict[str, np.ndarray]:
    _, indices = self._batches(k)
    elements = []
    for row, i in enumerate(indices[self._rows], start=self._first_row):
      element = self._source[int(i)]
      if self._draws or self._flip:
        rng = np.random.default_rng([self._seed, 7, k, row])
        if self._draws:
          element = _draw_latent(element, rng, self._flip)
        if self._flip_tensor:
          element = _random_flip(element, rng)
      elements.append(element)
    return {key: np.stack([e[key] for e in elements]) for key in elements[0]}


def _bucketed_iterator(config, source, batch_size, process_index, process_count, seed):
  """`build_train_iterator` for config.data.buckets: each global batch is one bucket's."""
  seed = config.train.seed if seed is None else seed
  sizes = buckets_lib.parse(config.data.buckets)
  global_batch = batch_size * process_count
  batches = buckets_lib.BucketBatches(source.bucket_of(), len(sizes), global_batch, seed)
  empty = [
    buckets_lib.format_sizes([s])
    for s, n in zip(sizes, batches.counts, strict=True)
    if n < global_batch
  ]
  if empty:
    logging.warning(
      "Buckets %s hold fewer elements than one global batch of %d and are never trained.",
      ", ".join(empty),
      global_batch,
    )
  read = _BucketRows(source, batches, batch_size, process_index, seed, config.data.random_flip)
  dataset = grain.MapDataset.range(batches.batches_per_epoch).repeat(None).map_with_index(read)
  iter_dataset = _iter_batches(dataset, config.data.num_workers)
  logging.info(
    "Train data: %d examples in buckets %s (%s elements), %d batches per epoch of %d on process "
    "%d of %d, seed %d.",
    len(source),
    config.data.buckets,
    batches.counts,
    batches.batches_per_epoch,
    batch_size,
    process_index,
    process_count,
    seed,
  )
  return iter(iter_dataset)


def real_images(
  config: ml_collections.ConfigDict, max_images: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Returns real data as arrays, in dataset order, neither shuffled nor flipped.

  Args:
    config: the full config; reads `config.data` and `config.model.num_classes`.
    max_images: if set and smaller than the dataset, take this many evenly spaced elements, so
      that class-sorted data (folders, digits) stays balanced.

  Returns:
    images float32 [N, H, W, C] and labels int32 [N].
  """
  if max_images is not None and max_images <= 0:
    raise DataError(f"max_images={max_images} must be positive.")
  source = build_source(config, num_classes=config.model.num_classes)
  count = len(source) if max_images is None else min(max_images, len(source))
  indices = np.linspace(0, len(source), count, endpoint=False).astype(np.int64)
  # Decoding dominates for image folders; PIL releases the GIL, so threads help.
  with futures.ThreadPoolExecutor(_NUM_THREADS) as pool:
    elements = list(pool.map(lambda i: source[int(i)], indices))
  images = np.stack([e["image"] for e in elements]).astype(np.float32)  # [N, H, W, C]
  labels = np.array([e["label"] for e in elements], np.int32)  # [N]
  return images, labels
