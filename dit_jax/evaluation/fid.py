"""ADM's evaluation suite over the FID Inception: FID, sFID, Inception Score, precision, recall.

  python -m dit_jax.evaluation.fid --reference=VIRTUAL_imagenet256_labeled.npz \
      --samples=workdir/samples/final.npz --inception=pt_inception-2015-12-05-6726825d.pth \
      [--out=scores.json] [--batch_size=64]

prints one JSON object: `fid`, `sfid`, `inception_score`, `precision`, `recall`, `num_samples`,
`num_reference`. The inputs are ADM's layout:

- `--samples`: an .npz with `arr_0`, uint8 images [N, H, W, 3] (what `--mode=sample` writes;
  grayscale [N, H, W] or [N, H, W, 1] is expanded to 3 channels).
- `--reference`: an ADM reference batch, i.e. an .npz with `arr_0` images and/or the statistics
  `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features). As in ADM's evaluator,
  statistics in the file are used for FID and sFID, and its images for precision and recall
  (which are null, with a log line, if the file holds no images). What is computed from the
  reference images is cached next to it (`REF.dit_jax_stats.npz`), keyed by the weights file's
  hash and the reference file's size, time and image count, so the second call is fast.

The metrics are those of `dit_jax.evaluation.metrics`; the library functions here
(`reference_statistics`, `score`, `score_features`, `featurize_npz`) are what the command is a
thin `main` over. `arr_0` is read in slices of the zip member, so 50,000 images never sit in
memory at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from absl import flags, logging

from dit_jax import cli, storage
from dit_jax.errors import ConfigError
from dit_jax.evaluation import metrics
from dit_jax.models import inception as inception_lib

# images [n, H, W, 3] uint8 -> {"pool": [n, 2048], "spatial": [n, S], "logits": [n, 1008]}
Featurizer = Callable[[np.ndarray], Mapping[str, np.ndarray]]

IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_KEYS = ("pool", "spatial", "logits")
CACHE_SUFFIX = ".dit_jax_stats.npz"
# Bumped when what the cache holds, or how it is computed, changes.
_CACHE_VERSION = 1
_CHUNK_IMAGES = 1024
WEIGHTS_HELP = inception_lib.WEIGHTS_HELP


class NpzImages:
  """The `arr_0` images of an .npz, read in slices of the first axis (ADM's layout).

  An .npz member cannot be memory-mapped; its bytes are streamed through `zipfile` instead (stored
  or deflated alike), so only one slice is in memory at a time.
  """

  def __init__(self, path: str):
    self.path = path
    self.keys = npz_keys(path)
    if IMAGES_KEY not in self.keys:
      hint = (
        "it holds latents: sample with config.vae.path set so that samples are decoded"
        if "latents" in self.keys
        else "ADM's layout keeps uint8 images [N, H, W, 3] there"
      )
      raise ConfigError(f"{path} has no {IMAGES_KEY} (it has {self.keys}); {hint}.")
    with _open_member(path) as f:
      shape, dtype, self._streamable = _read_npy_header(f, path)
    self.shape = shape
    _check_image_layout(f"{path}: {IMAGES_KEY}", shape, dtype)
    self.grayscale = len(shape) == 3 or shape[3] == 1
    if self.grayscale:
      logging.info("%s: grayscale images %s are expanded to 3 channels.", path, shape)

  def __len__(self) -> int:
    return self.shape[0]

  def chunks(self, size: int) -> Iterator[np.ndarray]:
    """Yields [n <= size, H, W, 3] uint8 slices, in order."""
    if not self._streamable:
      images = _load_whole(self.path)
      for start in range(0, len(self), size):
        yield self._as_rgb(images[start : start + size])
      return
    image_bytes = math.prod(self.shape[1:])
    with _open_member(self.path) as f:
      _read_npy_header(f, self.path)
      for start in range(0, len(self), size):
        n = min(size, len(self) - start)
        data = _read_exactly(f, n * image_bytes, self.path)
        yield self._as_rgb(np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:]))

  def _as_rgb(self, images: np.ndarray) -> np.ndarray:
    if not self.grayscale:
      return images
    return np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=3)  # [n, H, W, 3]


def npz_keys(path: str) -> list[str]:
  """The names of the arrays in an .npz, or a ConfigError if it is missing or not an .npz."""
  if not storage.isfile(path):
    raise ConfigError(f"There is no file {path}; pass the path of an .npz (ADM's layout).")
  with storage.open_read(path) as f:
    head = f.read(16)
  # Else np.load takes any other file for a pickle, and says that it refuses pickles.
  if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", np.lib.format.MAGIC_PREFIX)):
    raise ConfigError(
      f"{path} is not a readable .npz: it is not a zip archive (it begins {head!r}); write it "
      "again with np.savez."
    )
  if head.startswith(np.lib.format.MAGIC_PREFIX):
    raise ConfigError(f"{path} is a single .npy array, not an .npz; save it with np.savez.")
  try:
    with storage.open_read(path) as f, np.load(f) as loaded:
      return list(loaded.files)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ConfigError(f"{path} is not a readable .npz ({e}); write it again with np.savez.") from e


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


@contextlib.contextmanager
def _open_member(path: str) -> Iterator:
  """The raw .npy bytes of `arr_0`, as a file object."""
  try:
    with (
      storage.open_read(path) as raw,
      zipfile.ZipFile(raw) as zf,
      zf.open(f"{IMAGES_KEY}.npy") as f,
    ):
      yield f
  except ConfigError:
    raise
  except _READ_ERRORS as e:
    raise ConfigError(f"{path} is damaged ({e}); write it again with np.savez.") from e


def _read_npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
  """(shape, dtype, whether the data can be read in slices) of the .npy member `f`."""
  version = np.lib.format.read_magic(f)
  if version in ((1, 0), (2, 0)):
    read = np.lib.format.read_array_header_1_0
    if version == (2, 0):
      read = np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if not fortran_order:
      return shape, dtype, True
  # Rare layouts (a transposed array, a newer .npy version) are read whole, as ADM's reader does.
  array = _load_whole(path)
  return array.shape, array.dtype, False


def _load_whole(path: str) -> np.ndarray:
  with storage.open_read(path) as f, np.load(f) as z:
    return z[IMAGES_KEY]


def _read_exactly(f, size: int, path: str) -> bytes:
  parts, got = [], 0
  while got < size:
    part = f.read(size - got)
    if not part:
      break
    parts.append(part)
    got += len(part)
  if got < size:
    raise ConfigError(f"{path} ends early in {IMAGES_KEY}; write it again with np.savez.")
  return b"".join(parts)


def _check_image_layout(name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
  where = f"{name} {tuple(shape)} {dtype}"
  if dtype != np.uint8:
    raise ConfigError(
      f"{where}: images must be uint8 in [0, 255] (ADM's layout); convert them with "
      "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) if they are floats in [0, 1]."
    )
  if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
    raise ConfigError(f"{where} looks channels-first; images must be NHWC (transpose(0, 2, 3, 1)).")
  if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
    raise ConfigError(f"{where}: images must be [N, H, W, 3] (or grayscale [N, H, W, 1]).")
  if shape[0] < 2:
    raise ConfigError(f"{where}: need at least 2 images to estimate a covariance.")


def featurize_npz(path: str, featurize: Featurizer, chunk_size: int = _CHUNK_IMAGES) -> dict:
  """Features of the `arr_0` images of an .npz, read and featurized `chunk_size` at a time.

  Returns:
    {"pool": [N, 2048], "spatial": [N, S], "logits": [N, 1008]} float32 numpy arrays.
  """
  return _featurize_chunks(NpzImages(path).chunks(chunk_size), featurize, path)


def featurize_images(
  images: np.ndarray, featurize: Featurizer, chunk_size: int = _CHUNK_IMAGES
) -> dict:
  """Features of in-memory uint8 images [N, H, W, 3] (grayscale: expanded), a chunk at a time."""
  images = np.asarray(images)
  _check_image_layout("samples", images.shape, images.dtype)
  if images.ndim == 3 or images.shape[3] == 1:
    logging.info("Grayscale samples %s are expanded to 3 channels.", images.shape)
    images = np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=3)  # [N, H, W, 3]
  chunks = (images[i : i + chunk_size] for i in range(0, len(images), chunk_size))
  return _featurize_chunks(chunks, featurize, "samples")


def _featurize_chunks(chunks: Iterator[np.ndarray], featurize: Featurizer, name: str) -> dict:
  parts = {key: [] for key in FEATURE_KEYS}
  done = 0
  for chunk in chunks:
    features = featurize(chunk)
    for key in FEATURE_KEYS:
      value = np.asarray(features[key], dtype=np.float32)
      assert value.shape[0] == len(chunk), (key, value.shape, chunk.shape)
      parts[key].append(value.reshape(len(chunk), -1))
    done += len(chunk)
    logging.info("%s: featurized %d images.", name, done)
  return {key: np.concatenate(value) for key, value in parts.items()}


def weights_hash(path: str) -> str:
  """sha256 of a weights file (what keys the reference cache), or a ConfigError if it is missing."""
  if not storage.isfile(path):
    raise ConfigError(f"There is no Inception weights file {path}; pass {WEIGHTS_HELP}.")
  return storage.sha256(path)


def cache_path(path: str) -> str:
  """Where what is computed from reference `path` is cached: REF.npz -> REF.dit_jax_stats.npz."""
  base = path[: -len(".npz")] if path.endswith(".npz") else path
  return base + CACHE_SUFFIX


def reference_statistics(
  path: str,
  featurize: Featurizer,
  *,
  weights_id: str | None = None,
  chunk_size: int = _CHUNK_IMAGES,
) -> dict:
  """What the metrics need of a reference batch, computed once and cached next to the file.

  As ADM's evaluator: `mu`, `sigma`, `mu_s`, `sigma_s` stored in the file are used as they are;
  otherwise they come from its `arr_0` images. The images' pool features (precision and recall)
  are computed whenever the file has images.

  Args:
    path: the reference .npz.
    featurize: the FID Inception's features of a batch of uint8 images.
    weights_id: identifies the network whose features are cached (`weights_hash` of its weights
      file, plus its dtype if not float32); None does without the cache.
    chunk_size: images read and featurized at a time.

  Returns:
    {"mu", "sigma", "mu_s", "sigma_s": float64 statistics, "pool": [N, 2048] float32 features of
    the images or None, "num_images": N or None}.

  Raises:
    ConfigError: the file is missing or not an .npz, has neither images nor all four statistics,
      or its images are not uint8 [N, H, W, 3] with N >= 2.
  """
  keys = npz_keys(path)
  stored = [k for k in STATS_KEYS if k in keys]
  if stored and len(stored) < len(STATS_KEYS):
    missing = [k for k in STATS_KEYS if k not in keys]
    raise ConfigError(
      f"{path} has the statistics {stored} but not {missing}; a reference batch holds all of "
      f"{list(STATS_KEYS)}, or none of them and {IMAGES_KEY} images."
    )
  if not stored and IMAGES_KEY not in keys:
    raise ConfigError(
      f"{path} has neither {IMAGES_KEY} images nor the statistics {list(STATS_KEYS)} (it has "
      f"{keys}); pass an ADM reference batch or a samples file."
    )
  result = {"pool": None, "num_images": None}
  if stored:
    result.update(_load_statistics(path))
  if IMAGES_KEY not in keys:
    logging.warning(
      "%s holds statistics but no %s images: precision and recall are not computed.",
      path,
      IMAGES_KEY,
    )
    return result

  images = NpzImages(path)
  key = _cache_key(path, weights_id, len(images)) if weights_id else None
  cached = _read_cache(cache_path(path), key) if key else None
  if cached is None:
    features = featurize_npz(path, featurize, chunk_size)
    cached = {"pool": features["pool"]}
    for name, suffix in (("pool", ""), ("spatial", "_s")):
      cached["mu" + suffix], cached["sigma" + suffix] = metrics.feature_statistics(features[name])
    if key:
      _write_cache(cache_path(path), key, cached)
  result["pool"] = cached["pool"]
  result["num_images"] = len(images)
  if not stored:
    result.update({k: cached[k] for k in STATS_KEYS})
  return result


def _load_statistics(path: str) -> dict:
  try:
    with storage.open_read(path) as f, np.load(f) as z:
      stats = {k: np.asarray(z[k], dtype=np.float64) for k in STATS_KEYS}
  except _READ_ERRORS as e:
    raise ConfigError(f"{path}: the statistics cannot be read ({e}); write them again.") from e
  for suffix in ("", "_s"):
    mu, sigma = stats["mu" + suffix], stats["sigma" + suffix]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ConfigError(
        f"{path}: mu{suffix} {mu.shape} and sigma{suffix} {sigma.shape} must be [D] and [D, D]."
      )
  return stats


def _cache_key(path: str, weights_id: str, num_images: int) -> str:
  size, version = storage.stat(path)
  return json.dumps(
    {
      "version": _CACHE_VERSION,
      "weights": weights_id,
      "num_images": num_images,
      "size": size,
      "file_version": version,
    },
    sort_keys=True,
  )


def _read_cache(path: str, key: str) -> dict | None:
  if not storage.exists(path):
    return None
  try:
    with storage.open_read(path) as f, np.load(f) as z:
      if str(z["key"]) != key:
        logging.info("%s is of other weights or another reference; computing again.", path)
        return None
      cached = {k: z[k] for k in ("pool", *STATS_KEYS)}
  except _READ_ERRORS as e:
    logging.warning("%s cannot be read (%s); computing the statistics again.", path, e)
    return None
  logging.info("Reference statistics read from the cache %s.", path)
  return cached


def _write_cache(path: str, key: str, cached: dict) -> None:
  """Writes the cache atomically; a folder that cannot be written only costs the speed-up."""
  try:
    storage.save_npz(path, key=np.asarray(key), **cached)
  except OSError as e:
    logging.warning("Cannot write the cache %s (%s); going on.", path, e)
    return
  logging.info("Reference statistics cached in %s.", path)


def score_features(
  features: Mapping[str, np.ndarray], reference: Mapping, *, distance_dtype: str = "float16"
) -> dict:
  """ADM's metrics of samples' features against a reference (`reference_statistics`).

  Args:
    features: {"pool": [N, 2048], "spatial": [N, S], "logits": [N, 1008]} of the samples.
    reference: the reference batch's statistics and pool features.
    distance_dtype: of the pairwise distances of precision and recall ("float16" as ADM).

  Returns:
    {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference"};
    precision and recall are None when the reference has no images or either set has no more
    than k = 3 images.
  """
  num = features["pool"].shape[0]
  if num < 2:
    raise ConfigError(f"Need at least 2 samples to estimate a covariance, got {num}.")
  scores = {}
  for name, feature, suffix in (("fid", "pool", ""), ("sfid", "spatial", "_s")):
    mu, sigma = metrics.feature_statistics(features[feature])
    ref_mu = reference["mu" + suffix]
    if ref_mu.shape != mu.shape:
      raise ConfigError(
        f"The reference's mu{suffix} is {ref_mu.shape} but the samples' {feature} features are "
        f"{mu.shape}; the reference statistics come from another network."
      )
    scores[name] = metrics.frechet_distance(mu, sigma, ref_mu, reference["sigma" + suffix])
  scores["inception_score"] = metrics.inception_score(features["logits"])
  scores["precision"] = scores["recall"] = None
  ref_pool = reference.get("pool")
  k = metrics.PR_NEIGHBORHOOD
  if ref_pool is not None and min(num, ref_pool.shape[0]) > k:
    scores["precision"], scores["recall"] = metrics.precision_recall(
      ref_pool, features["pool"], k=k, distance_dtype=distance_dtype
    )
  elif ref_pool is not None:
    logging.warning("Precision and recall need more than %d images in each set; skipped.", k)
  scores["num_samples"] = num
  scores["num_reference"] = reference.get("num_images")
  return scores


def score(
  samples: np.ndarray,
  reference: Mapping,
  featurize: Featurizer,
  *,
  chunk_size: int = _CHUNK_IMAGES,
) -> dict:
  """`score_features` of in-memory uint8 samples [N, H, W, 3] against `reference`."""
  return score_features(featurize_images(samples, featurize, chunk_size), reference)


def _define_flags() -> None:
  # Defined only when run as a program, so that importing this module adds no flags.
  flags.DEFINE_string("reference", None, "ADM reference batch .npz (arr_0 and/or mu, sigma, ...).")
  flags.DEFINE_string("samples", None, "Samples .npz with arr_0 uint8 [N, H, W, 3].")
  flags.DEFINE_string("inception", None, f"Weights of the FID Inception: {WEIGHTS_HELP}.")
  flags.DEFINE_string("out", None, "Also write the scores to this JSON file.")
  flags.DEFINE_integer("batch_size", 64, "Images per Inception batch.")
  flags.mark_flags_as_required(["reference", "samples"])


def main(argv) -> None:
  del argv
  args = flags.FLAGS
  storage.check_reachable(args.samples, args.reference, args.inception)
  if not args.inception:
    raise ConfigError(f"Pass --inception=PATH, the weights of the FID Inception: {WEIGHTS_HELP}.")
  if args.batch_size < 1:
    raise ConfigError(f"--batch_size={args.batch_size} must be at least 1.")
  if args.out:
    try:
      storage.check_writable(args.out)
    except storage.StorageError as e:
      raise ConfigError(f"--out={e}") from None
  # Check both inputs before the network is built.
  reference_keys = npz_keys(args.reference)
  if IMAGES_KEY in reference_keys:
    NpzImages(args.reference)
  samples = NpzImages(args.samples)
  network = inception_lib.Inception.load(args.inception)
  weights_id = weights_hash(args.inception)

  def featurize(images):
    return network.features(images, batch_size=args.batch_size)

  chunk = max(1, _CHUNK_IMAGES // args.batch_size) * args.batch_size
  reference = reference_statistics(
    args.reference, featurize, weights_id=weights_id, chunk_size=chunk
  )
  features = _featurize_chunks(samples.chunks(chunk), featurize, args.samples)
  scores = score_features(features, reference)
  text = json.dumps(scores)
  if args.out:
    storage.write_text(args.out, text + "\n")
  print(text, flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
