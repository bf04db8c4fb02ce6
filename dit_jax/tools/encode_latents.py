"""Encodes a dataset's images with a VAE into the `latents` data that latent models train on.

  python -m dit_jax.tools.encode_latents --config=configs/dit_imagenet256.py \
      --source=tfds:imagenet2012 --vae=/models/sd-vae-ft-ema --out=/data/imagenet256_latents \
      --flip --std

The images come from pixel data that `dit_jax.data.build_source` reads: --source (a data name such
as folder, tfds:<name> or digits; default: the config's data.name if it is pixel data, required
when it is `latents`) and --source_path (data.path of a folder). For a config of latents, the
images are encoded at config.data.image_size x the VAE's downsample factor, so that the latents
have the config's shape; otherwise at config.data.image_size. Images are read in dataset order
(ADM's center crop, no shuffle, no flip) and encoded `--batch_size` at a time over all devices.

Writes into --out, in the layout of `dit_jax.data.latents`: latents.json (how they were made),
latents.npy (posterior means, already scaled: (mean - shift_factor) * scaling_factor), labels.npy
for class-labelled data, with --std latents_std.npy (posterior std x scaling_factor, for training
to sample the posterior afresh at every read), with --flip latents_flip.npy (+ latents_flip_std.npy)
of the horizontally flipped images (flipped after the crop, as DiT's training transform does).
float16 storage (the default) halves the files (ImageNet at 256 px: 10.5 GB instead of 21 GB per
array); --dtype=float32 keeps the encoder's values exactly.

With --format=array_record (the default for a gs:// --out) the same rows go into ArrayRecord
shards of --shard_size rows instead (`dit_jax.data.records`), each written whole once finished,
so a killed run resumes after its last whole shard, to the same bytes; training reads them from
the bucket with random access.

With config.data.buckets set (latent cells for a config of latents, pixels otherwise), each image
is read at the bucket nearest its aspect ratio (folder, TFDS, shapes or synthetic images), images
are encoded a batch of one bucket at a time, and the rows go into ArrayRecord shards with their
buckets (buckets-<i>-of-<n>.npy), for training in those buckets.

In the npy format the arrays are filled chunk by chunk through memory maps and progress.json records
the rows finished, so a killed run, rerun with the same arguments, resumes after its last finished
chunk and writes the same bytes as an uninterrupted run; a rerun with other arguments is refused. A
multi-process job reads every chunk in every process (the encoder takes the same global batch
everywhere) and only process 0 writes.
"""

import dataclasses
import time
from concurrent import futures

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from dit_jax import cli, parallel, storage
from dit_jax.data import buckets, latents, records, sources
from dit_jax.errors import ConfigError
from dit_jax.parallel import distributed

DTYPES = ("float16", "float32")
FORMATS = records.FORMATS
_READ_THREADS = 8  # Decoding images dominates for folders and TFDS; PIL releases the GIL.


def pixel_config(
  config: ml_collections.ConfigDict,
  vae_config,
  source: str = "",
  source_path: str = "",
) -> ml_collections.ConfigDict:
  """The config of the images to encode for `config`'s data.

  Args:
    config: a training config; its data describes latents (data.name="latents") or pixels.
    vae_config: the autoencoder's `AutoencoderConfig`.
    source: pixel data name (a `dit_jax.data.SOURCE_NAMES` entry other than latents); "" = the
      config's data.name, which must then be pixel data.
    source_path: config.data.path of the pixel data (an image folder); "" = the config's own
      for a pixel config.

  Returns:
    A copy of `config` whose data describes the images: name, path, channels (the VAE's input
    channels; digits stay grayscale), image_size (for latents: latent size x downsample factor)
    and buckets (in pixels).

  Raises:
    ConfigError: if the pixel data cannot be told from the arguments, the VAE's latents do not
      have the config's channels or size, or the buckets cannot be encoded from that data.
  """
  data = config.data
  is_latent = data.name == "latents"
  f = vae_config.downsample_factor
  name = source or data.name
  if name == "latents":
    raise ConfigError(
      "config.data.name='latents' describes the latents, not the images to encode; pass "
      "--source=<pixel data name> (e.g. --source=folder --source_path=DIR, or "
      "--source=tfds:imagenet2012)."
    )
  if is_latent:
    if vae_config.latent_channels != data.channels:
      raise ConfigError(
        f"The VAE makes {vae_config.latent_channels}-channel latents but "
        f"config.data.channels={data.channels}; pass the VAE the config was written for, or set "
        f"--config.data.channels={vae_config.latent_channels}."
      )
    image_size = data.image_size * f
  else:
    image_size = data.image_size
    if image_size % f:
      raise ConfigError(
        f"config.data.image_size={image_size} is not a multiple of the VAE's downsample factor "
        f"{f}; set it to a multiple of {f}."
      )
  path = source_path or ("" if is_latent or source else data.path)
  if name == "folder" and not path:
    raise ConfigError("--source=folder needs --source_path=<image folder with class sub-folders>.")
  pixel = config.copy_and_resolve_references()
  pixel.data.name = name
  pixel.data.path = storage.resolve(path) if path else ""
  pixel.data.image_size = image_size
  # Digits are grayscale only; they are repeated over the channels of an RGB encoder.
  pixel.data.channels = 1 if name == "digits" else vae_config.in_channels
  pixel.data.random_flip = False
  pixel.data.buckets = buckets.format_sizes(pixel_buckets(config, vae_config))
  kind = "tfds:<name>" if name.startswith("tfds:") else name
  if pixel.data.buckets and kind not in sources.ENCODED_IN_BUCKETS:
    raise ConfigError(
      f"config.data.buckets={config.data.buckets!r}, but the images to encode "
      f"({name!r}) cannot be read in buckets; encode from one of "
      f"{list(sources.ENCODED_IN_BUCKETS)}, or set --config.data.buckets=''."
    )
  if sources.wants_text(pixel) and name not in ("shapes", "synthetic"):
    # The images are read without captions (dit_jax.tools.encode_text writes those).
    pixel.model.name = "dit"
  return pixel


def pixel_buckets(config: ml_collections.ConfigDict, vae_config) -> tuple[tuple[int, int], ...]:
  """The pixel sizes of config.data.buckets (latent cells for a config of latents, else pixels).

  Raises:
    ConfigError: for pixel buckets the VAE cannot divide.
  """
  sizes = buckets.parse(config.data.buckets)
  f = vae_config.downsample_factor
  if config.data.name == "latents":
    return tuple((h * f, w * f) for h, w in sizes)
  for h, w in sizes:
    if h % f or w % f:
      raise ConfigError(
        f"config.data.buckets: the bucket {h}x{w} (pixels) is not a multiple of the VAE's "
        f"downsample factor {f}; use sizes whose sides are multiples of {f}."
      )
  return sizes


def _prepare(out: str, meta: latents.LatentsMetadata) -> int:
  """Creates or checks `out` for the run described by `meta`; returns the rows already done.

  The files appear in the order latents.json, progress.json (0 rows), the arrays; the arrays are
  rewritten only while progress.json says that no row is done, so no finished row is lost.
  """
  files = [*meta.latent_files(), latents.LABELS_FILE] if meta.has_labels else meta.latent_files()
  ours = (
    latents.LATENTS_FILE,
    latents.STD_FILE,
    latents.FLIP_FILE,
    latents.FLIP_STD_FILE,
    latents.LABELS_FILE,
  )
  present = [f for f in ours if storage.exists(storage.join(out, f))]
  old = latents.LatentsMetadata.load(out)
  if old is None:
    if present or storage.exists(storage.join(out, latents.PROGRESS_FILE)):
      raise ConfigError(
        f"--out={out!r} holds {present or [latents.PROGRESS_FILE]} but no "
        f"{latents.METADATA_FILE}, so they were not written by encode_latents; choose a new "
        "directory for --out."
      )
    storage.makedirs(out)
    meta.save(out)  # First: from here on a rerun knows which arguments these files belong to.
  elif old != meta:
    raise ConfigError(
      f"--out={out!r} holds latents made with other arguments: {'; '.join(old.differences(meta))}"
      ". Rerun with the same arguments to resume, or choose another --out."
    )
  rows = latents.read_progress(out)
  if rows is None:
    if present:
      raise ConfigError(
        f"--out={out!r} holds {present} but no {latents.PROGRESS_FILE}, so how many rows are "
        "done is unknown; choose a new directory for --out."
      )
    latents.write_progress(out, 0)
    rows = 0
  shape = (meta.count, meta.latent_size, meta.latent_size, meta.latent_channels)
  if rows == 0:
    for name in files:
      is_labels = name == latents.LABELS_FILE
      storage.open_memmap(
        storage.join(out, name),
        "w+",
        np.int32 if is_labels else meta.dtype,
        shape[:1] if is_labels else shape,
      )
    return 0
  for name in files:
    path = storage.join(out, name)
    want = shape[:1] if name == latents.LABELS_FILE else shape
    try:
      ok = storage.open_memmap(path).shape == want
    except (OSError, ValueError):
      ok = False
    if not ok:
      raise ConfigError(
        f"{path!r} is missing or not {list(want)} as {latents.METADATA_FILE} says; the "
        "directory is damaged: choose a new --out."
      )
  return min(rows, meta.count)


def _prepare_shards(out: str, meta: latents.LatentsMetadata) -> int:
  """`_prepare` for the array_record layout: the rows done are those of the unbroken run of
  finished shards from the first on (a shard file is there only once whole)."""
  old = latents.LatentsMetadata.load(out)
  present = set(storage.listdir(out))
  if old is None:
    ours = sorted(n for n in present if n.startswith(("latents-", "labels-", "buckets-")))
    if ours:
      raise ConfigError(
        f"--out={out!r} holds {ours[:3]} but no {latents.METADATA_FILE}, so they were not "
        "written by encode_latents; choose a new directory for --out."
      )
    meta.save(out)  # First: from here on a rerun knows which arguments these files belong to.
    return 0
  if old != meta:
    raise ConfigError(
      f"--out={out!r} holds latents made with other arguments: {'; '.join(old.differences(meta))}"
      ". Rerun with the same arguments to resume, or choose another --out."
    )
  names, done = records.shard_names("latents", meta.count, meta.shard_size), 0
  while done < len(names) and names[done] in present:
    done += 1
  return min(done * meta.shard_size, meta.count)


def _agree_on_start(out: str, meta: latents.LatentsMetadata) -> int:
  """Process 0 prepares `out`; every process learns the first row to encode (or the error)."""
  prepare = _prepare_shards if meta.format == records.FORMAT else _prepare
  return distributed.on_process_0(
    lambda: prepare(out, meta), f"write into --out={out!r}", "choose a writable directory."
  )


def _stored(x: np.ndarray, dtype: str, what: str) -> np.ndarray:
  with np.errstate(over="ignore"):  # Overflow is reported below as the error it is.
    stored = x.astype(dtype)
  if not np.isfinite(stored).all():
    fix = "--dtype=float32" if np.isfinite(x).all() else "--config.vae.dtype=float32"
    raise ConfigError(f"The {what} are not finite in {dtype} storage; rerun with {fix}.")
  return stored


def encode_latents(
  config: ml_collections.ConfigDict,
  vae_path: str,
  out: str,
  *,
  source: str = "",
  source_path: str = "",
  flip: bool = False,
  std: bool = False,
  batch_size: int = 64,
  dtype: str = "float16",
  vae=None,
  max_chunks: int | None = None,
  format: str = "",
  shard_size: int = 10_000,
) -> latents.LatentsMetadata:
  """Encodes the images of `config`'s pixel data (see `pixel_config`) into `out`.

  Resumes a run with the same arguments from its last finished chunk; returns at once if `out`
  is complete.

  Args:
    config: a training config (reads data, vae.dtype, parallel).
    vae_path: a diffusers AutoencoderKL directory.
    out: the output directory (created).
    source, source_path: the pixel data; see `pixel_config`.
    flip: also encode the horizontally flipped images (latents_flip.npy).
    std: also store the posterior standard deviations (latents_std.npy).
    batch_size: images per encoder call, the chunk written at a time.
    dtype: storage dtype of the latent arrays, "float16" or "float32".
    vae: the `dit_jax.vae.VAE` loaded from `vae_path`, if the caller has it (else it is loaded
      on a mesh of all devices).
    max_chunks: stop after encoding this many chunks (a test hook that simulates a kill).
    format: "npy" (memory-mapped arrays, local disks) or "array_record" (sharded, for buckets
      and pods: dit_jax.data.records); "" = array_record for a gs:// `out`, else npy.
    shard_size: rows per ArrayRecord shard (rounded up to a multiple of `batch_size`), each
      written whole; a rerun resumes after the last finished shard.

  Returns:
    The metadata of `out`.

  Raises:
    ConfigError: on bad arguments, pixel data that cannot be read, or an `out` that holds other
      files or latents made with other arguments (nothing is overwritten then).
  """
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not supported; choose one of {list(DTYPES)}.")
  if batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size} must be at least 1.")
  bucketed = bool(config.data.buckets)
  if bucketed and format == "npy":
    raise ConfigError(
      f"config.data.buckets={config.data.buckets!r}: latents in buckets have one shape per "
      "bucket, which the npy arrays cannot hold; use --format=array_record (the default with "
      "buckets)."
    )
  format = records.output_format(format, out, sharded_default=bucketed)
  if shard_size < 1:
    raise ConfigError(f"--shard_size={shard_size} must be at least 1.")
  shard_size = -(-shard_size // batch_size) * batch_size if format == records.FORMAT else 0
  if vae is None:
    from dit_jax.vae import VAE

    vae = VAE.load(vae_path, parallel.make_mesh(config), config.vae.dtype)
  vc = vae.config
  pixel = pixel_config(config, vc, source, source_path)
  try:
    src = sources.build_source(pixel, bucketed=bucketed, encoding=True)
  except ConfigError as e:
    # Its fields are derived here (e.g. image_size from the latent size), so say from what.
    d = pixel.data
    raise ConfigError(
      f"The images to encode (data.name={d.name!r}, data.path={d.path!r}, "
      f"data.image_size={d.image_size} for the VAE's latents of the config) cannot be read: {e}"
    ) from None
  count = len(src)
  meta = latents.LatentsMetadata(
    vae=storage.resolve(vae_path),
    scaling_factor=float(vc.scaling_factor),
    shift_factor=float(vc.shift_factor),
    latent_channels=vc.latent_channels,
    downsample_factor=vc.downsample_factor,
    image_size=pixel.data.image_size,
    crop=latents.NO_CROP if pixel.data.name in ("digits", "synthetic") else latents.ADM_CROP,
    flip=bool(flip),
    std=bool(std),
    count=count,
    source=pixel.data.name,
    source_path=pixel.data.path,
    source_split=pixel.data.split,
    dtype=dtype,
    compute_dtype=vae.dtype,
    batch_size=batch_size,
    has_labels="label" in src[0],
    format=format,
    shard_size=shard_size,
    buckets=buckets.format_sizes(
      buckets.scaled(buckets.parse(pixel.data.buckets), vc.downsample_factor)
    ),
  )
  start = _agree_on_start(out, meta)
  if start >= count:
    logging.info("%s is complete: %d latents; nothing to do.", out, count)
    return meta
  writer = jax.process_index() == 0
  if bucketed:
    return _encode_in_buckets(src, vae, meta, out, start, max_chunks)
  sharded = format == records.FORMAT
  arrays, shard = {}, {}  # The memory maps (npy); the rows of the shard being filled.
  if writer and not sharded:
    names = [*meta.latent_files(), *([latents.LABELS_FILE] if meta.has_labels else [])]
    arrays = {n: storage.open_memmap(storage.join(out, n), "r+") for n in names}

  def read(begin: int) -> tuple[np.ndarray, np.ndarray | None]:
    elements = list(pool.map(lambda i: src[i], range(begin, min(begin + batch_size, count))))
    images = np.stack([e["image"] for e in elements]).astype(np.float32)  # [B, H, W, C]
    if images.shape[-1] == 1 and vc.in_channels == 3:
      images = np.repeat(images, 3, axis=-1)
    labels = np.array([e["label"] for e in elements], np.int32) if meta.has_labels else None
    return images, labels

  def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _encode(vae, images, batch_size)

  from tqdm import tqdm

  chunks, began = 0, time.perf_counter()
  with (
    futures.ThreadPoolExecutor(_READ_THREADS) as pool,
    futures.ThreadPoolExecutor(1) as reader,
    tqdm(
      total=count,
      initial=start,
      desc="encode_latents",
      unit="img",
      dynamic_ncols=True,
      disable=not writer,
    ) as bar,
  ):
    pending = reader.submit(read, start)
    for begin in range(start, count, batch_size):
      images, labels = pending.result()
      end = begin + len(images)
      if end < count:  # Read the next chunk while this one is encoded.
        pending = reader.submit(read, end)
      results = dict(zip((latents.LATENTS_FILE, latents.STD_FILE), encode(images), strict=True))
      if flip:
        flipped = encode(images[:, :, ::-1])
        results.update(zip((latents.FLIP_FILE, latents.FLIP_STD_FILE), flipped, strict=True))
      # Every process holds the same results and checks them, so that all stop together on
      # values float16 cannot store (were process 0 alone to stop, the others would wait for it
      # in the next chunk's collectives).
      stored = {
        name: _stored(results[name], dtype, f"{name} values of images {begin}..{end - 1}")
        for name in meta.latent_files()
      }
      if writer and sharded:
        for name, values in stored.items():
          shard.setdefault(_RECORD_KEYS[name], []).append(values)
        if labels is not None:
          shard.setdefault("label", []).append(labels)
        if end % shard_size == 0 or end == count:
          _write_shard(out, meta, (end - 1) // shard_size, shard)
          shard = {}
      elif writer:
        for name, values in stored.items():
          arrays[name][begin:end] = values
        if labels is not None:
          arrays[latents.LABELS_FILE][begin:end] = labels
        for array in arrays.values():
          array.flush()
        latents.write_progress(out, end)  # Only after the rows are on disk.
      bar.update(end - begin)
      chunks += 1
      if max_chunks is not None and chunks >= max_chunks and end < count:
        pending.cancel()
        logging.info(
          "Stopping after %d chunks (max_chunks); %d of %d rows done.", chunks, end, count
        )
        return meta
  seconds = time.perf_counter() - began
  if not writer:
    return meta
  logging.info(
    "Wrote %d latents %s (%s) to %s: %d encoded in %.1f s (%.1f images/s).",
    count,
    [meta.latent_size, meta.latent_size, meta.latent_channels],
    dtype,
    out,
    count - start,
    seconds,
    (count - start) / max(seconds, 1e-9),
  )
  return meta


def _encode(vae, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) of `images` [n <= batch_size, ...], padded to `batch_size` so that every call
  has the compiled shape."""
  n = len(images)
  if n < batch_size:
    images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), np.float32)])
  mean, sd = vae.encode(images)
  return mean[:n], sd[:n]


_RECORD_KEYS = {
  latents.LATENTS_FILE: "latent",
  latents.STD_FILE: "latent_std",
  latents.FLIP_FILE: "latent_flip",
  latents.FLIP_STD_FILE: "latent_flip_std",
}


def _write_shard(
  out: str, meta: latents.LatentsMetadata, index: int, rows: dict, bucket_ids=None
) -> None:
  """Writes shard `index`: its labels (and buckets) first, then its records (whose file marks
  it done). `rows`: chunks [rows, ...] by key, or with `bucket_ids` one array per row."""
  n = records.num_shards(meta.count, meta.shard_size)
  labels = rows.pop("label", None)
  if bucket_ids is None:
    rows = {k: np.concatenate(v) for k, v in rows.items()}
    labels = None if labels is None else np.concatenate(labels)
  else:
    storage.save_npy(storage.join(out, records.shard_name("buckets", index, n)), bucket_ids)
  if labels is not None:
    storage.save_npy(storage.join(out, records.shard_name("labels", index, n)), labels)
  records.write_shard(storage.join(out, records.shard_name("latents", index, n)), rows)


def _encode_in_buckets(src, vae, meta, out, start, max_chunks) -> latents.LatentsMetadata:
  """`encode_latents` for config.data.buckets: each image comes from the source at the size of
  its bucket; images wait in a queue per bucket and are encoded `meta.batch_size` at a time (the
  one compiled shape of each bucket); a shard's remaining queues are encoded (padded) before it
  is written, so every shard is encoded the same way however often the run is resumed."""
  f, b = meta.downsample_factor, meta.batch_size
  sizes = buckets.parse(meta.buckets)
  bucket_index = {(h * f, w * f): i for i, (h, w) in enumerate(sizes)}
  writer = jax.process_index() == 0
  keys = {name: _RECORD_KEYS[name] for name in meta.latent_files()}

  def flush(queue: list, rows: dict) -> None:
    """Encodes the (row, image) pairs of one bucket's `queue` into `rows`; empties it."""
    at = [r for r, _ in queue]
    images = np.stack([image for _, image in queue])
    queue.clear()
    names = (latents.LATENTS_FILE, latents.STD_FILE)
    results = dict(zip(names, _encode(vae, images, b), strict=True))
    if meta.flip:
      names = (latents.FLIP_FILE, latents.FLIP_STD_FILE)
      results.update(zip(names, _encode(vae, images[:, :, ::-1], b), strict=True))
    for name, key in keys.items():
      stored = _stored(results[name], meta.dtype, f"{name} values of images {at}")
      for j, r in enumerate(at):
        rows[key][r] = stored[j]

  from tqdm import tqdm

  chunks, counts = 0, np.zeros(len(sizes), np.int64)
  with (
    futures.ThreadPoolExecutor(_READ_THREADS) as pool,
    futures.ThreadPoolExecutor(1) as reader,
    tqdm(
      total=meta.count, initial=start, desc="encode_latents", unit="img", disable=not writer
    ) as bar,
  ):

    def read(begin: int, end: int) -> list:
      return list(pool.map(lambda i: src[i], range(begin, end)))

    for shard in range(start // meta.shard_size, records.num_shards(meta.count, meta.shard_size)):
      lo = shard * meta.shard_size
      hi = min(meta.count, lo + meta.shard_size)
      rows = {key: [None] * (hi - lo) for key in keys.values()}
      labels, bucket_ids = [], np.zeros(hi - lo, np.int32)
      queues = [[] for _ in sizes]
      pending = reader.submit(read, lo, min(lo + b, hi))
      for begin in range(lo, hi, b):
        elements = pending.result()
        if begin + b < hi:  # Read the next chunk while this one is encoded.
          pending = reader.submit(read, begin + b, min(begin + 2 * b, hi))
        for r, element in enumerate(elements, start=begin - lo):
          image = np.asarray(element["image"], np.float32)
          bucket = bucket_index[image.shape[:2]]
          bucket_ids[r] = bucket
          if meta.has_labels:
            labels.append(element["label"])
          queues[bucket].append((r, image))
          if len(queues[bucket]) == b:
            flush(queues[bucket], rows)
        bar.update(len(elements))
        chunks += 1
      for queue in queues:
        if queue:  # The shard's partial batches, padded.
          flush(queue, rows)
      counts += np.bincount(bucket_ids, minlength=len(sizes))
      if writer:
        if meta.has_labels:
          rows["label"] = np.asarray(labels, np.int32)
        _write_shard(out, meta, shard, rows, bucket_ids)
      if max_chunks is not None and chunks >= max_chunks and hi < meta.count:
        logging.info("Stopping after %d chunks (max_chunks), with shard %d.", chunks, shard)
        return meta
  logging.info(
    "Wrote latents %d..%d in buckets %s (elements per bucket: %s) to %s.",
    start,
    meta.count - 1,
    meta.buckets,
    counts.tolist(),
    out,
  )
  return meta


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that importing the module defines none."""
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
  flags.DEFINE_string("vae", None, "Diffusers AutoencoderKL directory.")
  flags.DEFINE_string("out", None, "Output directory (the training config's data.path).")
  flags.DEFINE_string("source", "", "Pixel data name (default: the config's, if pixel data).")
  flags.DEFINE_string("source_path", "", "data.path of the pixel data (an image folder).")
  flags.DEFINE_bool("flip", False, "Also encode the horizontally flipped images.")
  flags.DEFINE_bool("std", False, "Also store the posterior std (training samples from it).")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call over all devices.")
  flags.DEFINE_enum("dtype", "float16", DTYPES, "Storage dtype of the latents.")
  flags.DEFINE_string(
    "format", "", "npy | array_record (sharded; for buckets); default array_record on gs://."
  )
  flags.DEFINE_integer("shard_size", 10_000, "Rows per array_record shard.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
  flags.mark_flags_as_required(["config", "vae", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  storage.check_reachable(f.out, f.vae, f.source_path)
  cli.check_config_paths(f.config)
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  meta = encode_latents(
    f.config,
    f.vae,
    f.out,
    source=f.source,
    source_path=f.source_path,
    flip=f.flip,
    std=f.std,
    batch_size=f.batch_size,
    dtype=f.dtype,
    format=f.format,
    shard_size=f.shard_size,
  )
  if jax.process_index() == 0:
    logging.info("%s: %s", f.out, dataclasses.asdict(meta))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
