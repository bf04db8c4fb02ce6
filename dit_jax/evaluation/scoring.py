"""A model's samples scored as the papers score them: FID, sFID, Inception Score, precision and
recall with the FID Inception, for `--mode=evaluate` and for evaluation during training
(`train.eval_every`); and the built-in metrics of the toy data (digits, shapes).

The reference (`Scorer.reference`) is `config.eval.reference`, an ADM reference batch (read by
`fid.reference_statistics`, which caches what it computes next to the file), or, if that is empty,
the config's own training data: min(its size, eval.num_images) images spread evenly through it,
neither shuffled nor flipped, decoded by the VAE for latent data, featurized once and cached as
`workdir/eval/reference_<key>.npz`. The key hashes everything those features depend on (the data
fields, the VAE, the Inception weights, the count), so a config that differs in any of them
computes its own.

The samples (`Scorer.score`) are those `sampling.write_samples` writes for the same config, chunk
by chunk, but they never leave the devices that made them: each process decodes, rounds to uint8
and featurizes its rows of every chunk, and only the features (5,079 floats an image) are
gathered. Process 0 writes each chunk's features to `<name>.parts/<start>-<end>.npy` beside a
fingerprint of everything they depend on (sampling's `.parts` machinery), so a killed evaluation
resumes after its last whole chunk and scores the same; the caller removes the directory once the
scores are written. The own reference is computed in the same resumable chunks.
"""

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import data, experiment, parallel, storage
from dit_jax.errors import ConfigError
from dit_jax.evaluation import checks, fid, metrics, sampling
from dit_jax.evaluation.conditions import conditions
from dit_jax.models import inception as inception_lib
from dit_jax.parallel import distributed

# What is stored of each image, side by side in one float32 row: (name, width).
FEATURES = (
  ("pool", 2048),
  ("spatial", 17 * 17 * inception_lib.SPATIAL_CHANNELS),
  ("logits", inception_lib.NUM_LOGITS),
)
FEATURE_DIM = sum(width for _, width in FEATURES)
# The scores of the Inception, as they go into eval/<name>.json and metrics.jsonl.
SCORE_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")
# eval/<this>.parts holds the chunks of an evaluation during training.
TRAINING_PARTS = "during_training"
# Bumped when what the own reference holds, or how it is computed, changes.
_REFERENCE_VERSION = 1
_READ_THREADS = 4
_RETRY = "make room there or make it writable, then rerun the same command, which resumes."


def eval_files(workdir: str, name: str) -> tuple[str, str]:
  """(scores json, chunk directory) of the evaluation named `name` in `workdir`."""
  base = storage.join(workdir, "eval", name)
  return base + ".json", base + ".parts"


def split_features(rows: np.ndarray) -> dict[str, np.ndarray]:
  """Stored rows [N, FEATURE_DIM] -> {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}
  (views)."""
  out, at = {}, 0
  for name, width in FEATURES:
    out[name] = rows[:, at : at + width]
    at += width
  return out


def _to_uint8_rgb(images: jax.Array) -> jax.Array:
  """[-1, 1] floats [B, H, W, 1 or 3] -> uint8 [B, H, W, 3], rounded as `utils.to_uint8` rounds
  the images that --mode=sample writes."""
  u8 = jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return jnp.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8


class _NeedsFeatures(Exception):
  """A reference batch's statistics cannot be had without featurizing its images."""


def _on_process_0(fn: Callable[[], Any], task: str) -> Any:
  """fn() on process 0 (its value there, None on the others); its errors stop every process."""
  box = {}
  distributed.on_process_0(lambda: box.update(value=fn()), task, _RETRY)
  return box.get("value")


@jax.jit
def _checksum_terms(params) -> jax.Array:
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(params)]
  return jnp.stack([jnp.sum(x) for x in leaves] + [jnp.sum(x * x) for x in leaves])


def params_checksum(params) -> str:
  """A digest of parameters (sums over every array): equal for the very same parameters on the
  same mesh, different after any training step. Keys the chunks of an evaluation during
  training, so that a resumed run reuses only features of the same parameters."""
  terms = np.asarray(multihost_utils.process_allgather(_checksum_terms(params)), np.float32)
  return hashlib.sha256(terms.tobytes()).hexdigest()


def featurize_sharded(
  inception: inception_lib.Inception, images: jax.Array, count: int, batch_size: int
) -> np.ndarray:
  """Features [count, FEATURE_DIM] (on every process) of the first `count` rows of uint8 images
  [P, H, W, 3], a global array split over the data axes of `inception.mesh`.

  Each device featurizes its own rows, about `batch_size` images over the mesh at a time: the
  rows of one step are sliced out of every device's shard where it lies, so no image moves
  between devices; the features are gathered and put back in the images' order.
  """
  total, dp = images.shape[0], parallel.data_parallel_size(inception.mesh)
  assert total % dp == 0 and images.dtype == jnp.uint8, (images.shape, images.dtype, dp)
  rows = total // dp  # Per shard: device k (along the data axes) holds rows [k*rows, (k+1)*rows).
  steps = -(-rows // max(1, batch_size // dp))
  step = -(-rows // steps)  # At most batch_size // dp rows a device, in steps of equal size.
  pending = []
  for s in range(0, rows, step):
    n = min(step, rows - s)
    pieces = []
    for shard in images.addressable_shards:
      piece = shard.data[s : s + n]
      if n < step:  # The same shape every step: one compile.
        piece = jnp.pad(piece, ((0, step - n), (0, 0), (0, 0), (0, 0)))
      pieces.append(piece)
    batch = jax.make_array_from_single_device_arrays(
      (dp * step, *images.shape[1:]), images.sharding, pieces
    )  # Row k*step + j is row k*rows + s + j of `images`.
    pending.append((s, n, inception.features_sharded(batch)))
  out = np.empty((dp, rows, FEATURE_DIM), np.float32)
  for s, n, features in pending:  # All steps are dispatched before the first result is read.
    features = multihost_utils.process_allgather(features, tiled=True)
    flat = np.concatenate(
      [np.asarray(features[name], np.float32).reshape(dp * step, -1) for name, _ in FEATURES],
      axis=1,
    )  # [dp * step, FEATURE_DIM]
    out[:, s : s + n] = flat.reshape(dp, step, FEATURE_DIM)[:, :n]
  return out.reshape(total, FEATURE_DIM)[:count]


class Scorer:
  """The FID Inception over an experiment's mesh with the reference it scores against: built
  once (which loads the weights, the VAE of a latent model, and computes or reads the reference,
  so that a bad file stops the run at once), then `score(params, ...)` per evaluation. `run` is
  a `sampling.make_sampler(exp)` to share (compiled once), or None for a new one.

  Scores are computed on process 0; the other processes take part in sampling and featurizing
  and get None.

  Attributes:
    reference: on process 0, what `fid.score_features` needs of the reference.
    reference_name: config.eval.reference, or the cache file of the own reference.
  """

  def __init__(
    self,
    exp: experiment.Experiment,
    workdir: str,
    *,
    run=None,
    progress: bool = True,
    decoder: Any = "load",
  ):
    cfg = exp.config
    self.exp, self.config, self.workdir, self.progress = exp, cfg, workdir, progress
    self.batch_size = cfg.eval.batch_size
    self.weights_id = fid.weights_hash(cfg.eval.inception_weights)
    self.inception = inception_lib.Inception.load(cfg.eval.inception_weights, exp.mesh)
    loaded = isinstance(decoder, str)  # Not given: its own (`sampling.load_decoder`).
    self.decoder = sampling.load_decoder(cfg, exp.mesh) if loaded else decoder
    channels = cfg.data.channels if self.decoder is None else self.decoder.config.out_channels
    if channels not in (1, 3):
      raise ConfigError(
        f"The samples have {channels} channels; the FID Inception scores RGB (or grayscale) "
        "images: set config.vae.path to the VAE that decodes the model's latents to RGB."
      )
    self.run = run or sampling.make_sampler(exp)
    self.clip = None
    if cfg.eval.clip_model:
      from dit_jax.evaluation import clip_score

      self.clip = clip_score.ClipScorer.load(cfg.eval.clip_model, exp.mesh, cfg.eval.batch_size)
    batch = parallel.batch_sharding(exp.mesh)
    self._to_uint8 = jax.jit(_to_uint8_rgb, in_shardings=batch, out_shardings=batch)
    if cfg.eval.reference:
      self.reference_name = cfg.eval.reference
      self.reference = self._file_reference(cfg.eval.reference)
    else:
      self.reference = self._own_reference()

  # --- Features -------------------------------------------------------------------------------

  def _features(self, images: jax.Array, count: int) -> np.ndarray:
    """`featurize_sharded` of the first `count` rows of a global float array of images in
    [-1, 1] (rounded to uint8 as --mode=sample rounds them)."""
    return featurize_sharded(self.inception, self._to_uint8(images), count, self.batch_size)

  def _in_parts(
    self,
    parts_dir: str,
    want: dict,
    num: int,
    chunks: Callable[[int], Iterator[tuple[int, np.ndarray]]],
    *,
    overwrite: bool,
    field: str,
    desc: str,
    width: int = FEATURE_DIM,
  ) -> np.ndarray | None:
    """Features [num, width] on process 0 (None elsewhere) of the chunks that
    `chunks(first)` yields as (start, features) from `first` on, each written to `parts_dir` as
    it is done; a rerun with the same fingerprint `want` continues after the last whole chunk."""

    store = storage.ChunkStore(parts_dir, (width,), np.float32)

    def prepare() -> int:
      return store.resume(want, overwrite=overwrite, field=field)

    first = distributed.on_process_0(prepare, f"prepare {parts_dir}", _RETRY)
    if first and jax.process_index() == 0:
      logging.info("Resuming: the features of %d of %d images are in %s.", first, num, parts_dir)
    bar = None
    if self.progress and jax.process_index() == 0:
      from tqdm import tqdm

      bar = tqdm(total=num, initial=first, desc=desc, unit="img", dynamic_ncols=True)
    try:
      for start, features in chunks(first):
        distributed.on_process_0(
          lambda start=start, features=features: store.put(start, features),
          f"write features into {parts_dir}",
          _RETRY,
        )
        if bar is not None:
          bar.update(len(features))
    finally:
      if bar is not None:
        bar.close()

    return _on_process_0(lambda: store.read(num), f"read the features in {parts_dir}")

  # --- The reference --------------------------------------------------------------------------

  def _file_reference(self, path: str) -> dict | None:
    """`fid.reference_statistics` of an ADM reference batch. Process 0 first looks whether it
    can do without featurizing (statistics in the file, or its cache), so that every process
    joins the same Inception calls or none."""
    chunk = max(1, 1024 // self.batch_size) * self.batch_size

    def statistics(featurize) -> dict:
      try:
        return fid.reference_statistics(
          path, featurize, weights_id=self.weights_id, chunk_size=chunk
        )
      except ConfigError as e:
        raise ConfigError(f"config.eval.reference={path!r}: {e}") from None

    def never(images):
      raise _NeedsFeatures

    found = {}

    def probe() -> int:
      try:
        found["stats"] = statistics(never)
      except _NeedsFeatures:
        return 0
      return 1

    if not distributed.on_process_0(probe, f"read {path}", _RETRY):
      found["stats"] = statistics(lambda images: self.inception.features(images, self.batch_size))

    def check() -> None:
      # A reference of another network is found now rather than after sampling.
      got = [found["stats"][k].shape for k in ("mu", "mu_s")]
      want = [(width,) for name, width in FEATURES if name != "logits"]
      if got != want:
        raise ConfigError(
          f"config.eval.reference={path!r} holds statistics mu {got[0]} and mu_s {got[1]}, but "
          f"the FID Inception's pool and spatial features are {want[0]} and {want[1]}: it comes "
          "from another network; pass an ADM reference batch (or its images)."
        )

    distributed.on_process_0(check, f"read {path}", _RETRY)
    return found["stats"] if jax.process_index() == 0 else None

  def _reference_key(self, size: int, count: int) -> dict:
    cfg = self.config.to_dict()
    key = {"version": _REFERENCE_VERSION, "inception_sha256": self.weights_id}
    key.update({"num_images": count, "data_size": size})
    # Flips, workers and prefetching do not change the images read here.
    ignored = ("random_flip", "num_workers", "prefetch")
    key.update({f"data.{k}": v for k, v in cfg["data"].items() if k not in ignored})
    if self.config.data.path:
      key["data.path"] = storage.resolve(self.config.data.path)
    if self.config.data.name == "synthetic":
      key["train.seed"] = self.config.train.seed  # Synthetic images are drawn from it.
    if self.decoder is not None:
      key.update(
        {"vae.path": storage.resolve(self.config.vae.path), "vae.dtype": self.config.vae.dtype}
      )
    return json.loads(json.dumps(key))

  def _own_reference(self) -> dict | None:
    """The statistics of the config's own data (see the module docstring), on process 0."""
    cfg = self.config
    source = data.build_source(cfg, num_classes=cfg.model.num_classes)
    count = min(len(source), cfg.eval.num_images)
    if count < 2:
      raise ConfigError(
        f"config.data.name={cfg.data.name!r} holds {len(source)} image(s), too few for reference "
        "statistics; set config.eval.reference to an ADM reference batch."
      )
    key = self._reference_key(len(source), count)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = storage.join(self.workdir, "eval", f"reference_{digest}.npz")
    self.reference_name = path

    def read() -> dict | None:
      if not storage.isfile(path):
        return None
      try:
        z = storage.load_npz(path)
        if str(z["key"]) == json.dumps(key, sort_keys=True):
          stats = {k: np.asarray(z[k], np.float64) for k in fid.STATS_KEYS}
          return {**stats, "pool": z["pool"], "num_images": int(z["num_images"])}
      except (OSError, ValueError, KeyError, EOFError) as e:
        logging.warning("%s cannot be read (%s); computing the reference again.", path, e)
      return None

    cached = _on_process_0(read, f"read {path}")
    proc0 = jax.process_index() == 0
    if distributed.on_process_0(lambda: int(cached is not None), f"read {path}", _RETRY):
      if proc0:
        logging.info("Reference statistics of the training data read from %s.", path)
      return cached
    if proc0:
      logging.info(
        "Featurizing %d images of the training data (config.data.name=%r) as the reference; "
        "cached in %s for later evaluations.",
        count,
        cfg.data.name,
        path,
      )
    indices = np.linspace(0, len(source), count, endpoint=False).astype(np.int64)
    dp = parallel.data_parallel_size(self.exp.mesh)
    chunk = -(-self.batch_size // dp) * dp
    pool = futures.ThreadPoolExecutor(_READ_THREADS)

    def chunks(first: int) -> Iterator[tuple[int, np.ndarray]]:
      for start in range(first, count, chunk):
        # Padding rows (the first images again) are featurized and dropped.
        rows = indices[np.arange(start, start + chunk) % count]
        images = self._read(source, rows, pool)
        if self.decoder is not None:
          images = self.decoder.decode_sharded(images)
        yield start, self._features(images, min(chunk, count - start))

    parts_dir = path.removesuffix(".npz") + ".parts"
    try:
      features = self._in_parts(
        parts_dir, key, count, chunks, overwrite=True, field="eval.reference", desc="reference"
      )
    finally:
      pool.shutdown()

    def write() -> dict:
      split = split_features(features)
      stats = {}
      for name, suffix in (("pool", ""), ("spatial", "_s")):
        stats["mu" + suffix], stats["sigma" + suffix] = metrics.feature_statistics(split[name])
      reference = {**stats, "pool": np.ascontiguousarray(split["pool"]), "num_images": count}
      storage.save_npz(path, key=np.asarray(json.dumps(key, sort_keys=True)), **reference)
      storage.rmtree(parts_dir)
      return reference

    return _on_process_0(write, f"write {path}")

  def _read(self, source, rows: np.ndarray, pool: futures.Executor) -> jax.Array:
    """Elements `rows` of `source` as a global array [len(rows), H, W, C] split over the mesh's
    data axes; each process reads only the rows its devices hold."""
    d = self.config.data
    shape = (len(rows), d.image_size, d.image_size, d.channels)
    sharding = parallel.batch_sharding(self.exp.mesh)
    wanted = sharding.addressable_devices_indices_map(shape)
    mine = sorted({i for index in wanted.values() for i in range(*index[0].indices(len(rows)))})
    images = dict(
      zip(
        mine,
        pool.map(lambda i: np.asarray(source[int(rows[i])]["image"], np.float32), mine),
        strict=True,
      )
    )

    def local(index) -> np.ndarray:
      return np.stack([images[i] for i in range(*index[0].indices(len(rows)))])

    return jax.make_array_from_callback(shape, sharding, local)

  # --- Scores ---------------------------------------------------------------------------------

  def _scores(self, features: Mapping[str, np.ndarray]) -> dict:
    scores = fid.score_features(features, self.reference)
    out = {k: scores[k] for k in SCORE_KEYS}
    out.update(num_reference=scores["num_reference"], reference=self.reference_name)
    return out

  def _clip_features(self, images: jax.Array, count: int) -> np.ndarray:
    """CLIP image embeddings [count, dim] of the first `count` rows of a global float array of
    images in [-1, 1] (rounded to uint8 as for the Inception)."""
    uint8 = multihost_utils.process_allgather(self._to_uint8(images), tiled=True)
    return self.clip.image_features(np.asarray(uint8)[:count])

  def score(
    self,
    params,
    *,
    step: int,
    num_images: int,
    parts_dir: str,
    overwrite: bool = False,
    field: str = "eval.name",
    fingerprint: Mapping | None = None,
  ) -> dict | None:
    """Samples `num_images` with `params` (config.sample's settings and seed) and scores them
    against the reference, in chunks kept in `parts_dir` (see the module docstring).

    Args:
      params: the model's parameters (EMA or raw) on the experiment's mesh.
      step: the training step of `params` (recorded in the fingerprint).
      num_images: samples to score, at least 2.
      parts_dir: where the chunks' features are kept until the caller removes it (`finish`).
      overwrite: remove chunks of another config there instead of stopping with an error.
      field: the config field that names `parts_dir`, for that error.
      fingerprint: more that the features depend on (added to the fingerprint).

    Returns:
      On process 0: {"fid", "sfid", "inception_score", "precision", "recall", "num_reference",
      "reference"}; None on the others.
    """
    cfg = self.config
    seed = cfg.sample.seed
    conds = conditions(cfg, num_images, seed)
    want = sampling.fingerprint(
      cfg, step=step, num_images=num_images, seed=seed, key="inception_features", meta=conds.meta
    )
    want.update(inception_sha256=self.weights_id, **(fingerprint or {}))
    if self.clip is not None:
      want["clip_model"] = cfg.eval.clip_model  # Its image embeddings follow the Inception's.
    width = FEATURE_DIM + (self.clip.dim if self.clip is not None else 0)
    batch = sampling.chunk_size(cfg, num_images)

    def chunks(first: int) -> Iterator[tuple[int, np.ndarray]]:
      for start, images in sampling.sample_chunks(
        self.exp,
        self.run,
        params,
        conds,
        num_images,
        seed=seed,
        first=first,
        decoder=self.decoder,
        gather=False,
      ):
        count = min(batch, num_images - start)
        features = self._features(images, count)
        if self.clip is not None:
          features = np.concatenate([features, self._clip_features(images, count)], axis=1)
        yield start, features

    features = self._in_parts(
      parts_dir,
      want,
      num_images,
      chunks,
      overwrite=overwrite,
      field=field,
      desc="evaluating",
      width=width,
    )
    # The text tower runs on every process (a collective); the scores on process 0.
    clip_scores = {}
    if self.clip is not None:
      rows = np.zeros((num_images, self.clip.dim), np.float32)
      if features is not None:
        rows = features[:, FEATURE_DIM:]
      rows = np.asarray(multihost_utils.broadcast_one_to_all(rows))
      clip_scores = self.clip.score(rows, conds.meta["captions"])

    def scores() -> dict:
      out = self._scores(split_features(features[:, :FEATURE_DIM]))
      return {**out, **clip_scores}

    return _on_process_0(scores, "score the samples")

  def score_images(self, images: np.ndarray) -> dict | None:
    """The scores (as `score`) of uint8 images [N, H, W, 1 or 3] that every process holds whole
    (the toy data's samples, which sit in memory anyway)."""
    features = self.inception.features(images, self.batch_size)
    return _on_process_0(lambda: self._scores(features), "score the samples")

  def finish(self, parts_dir: str) -> None:
    """Removes the chunks of a finished evaluation."""

    distributed.on_process_0(lambda: storage.rmtree(parts_dir), f"remove {parts_dir}", _RETRY)


def builtin_scorer(config: ml_collections.ConfigDict) -> Callable[[np.ndarray, Mapping], dict]:
  """The built-in metrics of the toy data: score(images in [-1, 1], their labels or captions).

  - digits: class accuracy (a classifier trained on the real digits), the Fréchet distance in
    its feature space to all the real digits, and the diversity: the mean distance between two
    samples of the same class in that space over the real digits' (`within_class_distance`;
    left out when no class has two samples);
  - shapes: the fraction of images whose colour, shape and position (read back by
    `shapes_checker`) all match their prompt.
  """
  if config.data.name == "digits":
    from dit_jax.models import digits_cnn

    classifier = digits_cnn.load_classifier()
    real, real_labels = data.real_images(config)
    real_features = classifier.features(real)
    mu_r, sig_r = metrics.feature_statistics(real_features)
    real_spread = metrics.within_class_distance(real_features, real_labels)

    def digits(images: np.ndarray, meta: Mapping) -> dict:
      features = classifier.features(images)
      mu_g, sig_g = metrics.feature_statistics(features)
      scores = {
        "class_accuracy": float(metrics.accuracy(classifier.predict(images), meta["labels"])),
        "frechet_distance": float(metrics.frechet_distance(mu_g, sig_g, mu_r, sig_r)),
      }
      if np.bincount(np.asarray(meta["labels"])).max() >= 2:  # Else no pair of one class.
        # Same-class spread in the classifier's features over the real digits' (1 = as diverse).
        distance = metrics.within_class_distance(features, meta["labels"])
        scores["diversity"] = distance / real_spread
      return scores

    return digits
  if config.data.name != "shapes":
    raise ConfigError(
      f"config.data.name={config.data.name!r} has no built-in metrics (only "
      f"{' and '.join(checks.BUILTIN_METRICS_DATA)} do)."
    )
  from dit_jax.evaluation import shapes_checker

  def shapes(images: np.ndarray, meta: Mapping) -> dict:
    scores = shapes_checker.score(images, [str(c) for c in meta["captions"]])
    return {k: float(v) for k, v in scores.items()}

  return shapes
