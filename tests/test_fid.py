"""ADM's metrics (FID, sFID, Inception Score, precision and recall) and the evaluator
`python -m dit_jax.evaluation.fid`.

The formulas are checked against plain reimplementations of pytorch-fid's and ADM's code and on
small cases worked out by hand; the library's file handling with a cheap stand-in featurizer; the
command line end to end with random weights of the real Inception.
"""

import hashlib
import json
import os
import zipfile

import _cli
import numpy as np
import pytest
import scipy.linalg
import scipy.special

from dit_jax import storage
from dit_jax.errors import ConfigError
from dit_jax.evaluation import fid, metrics
from dit_jax.models import inception

# What the evaluator reports, as ADM's interface names it.
SCORE_KEYS = {
  "fid",
  "sfid",
  "inception_score",
  "precision",
  "recall",
  "num_samples",
  "num_reference",
}

# --- Plain reimplementations of the reference formulas -------------------------------------


def reference_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's calculate_frechet_distance, written out step by step."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("imaginary component")
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def reference_inception_score(logits, split_size):
  """ADM's compute_inception_score, on softmax probabilities."""
  preds = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i : i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return np.mean(scores)


def reference_precision_recall(real, fake, k=3):
  """Improved precision and recall by brute force: full distance matrices, sorted."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

  def sq_dist(a, b):
    return np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)

  radii_real = np.sort(sq_dist(real, real), axis=1)[:, k]
  radii_fake = np.sort(sq_dist(fake, fake), axis=1)[:, k]
  d = sq_dist(real, fake)  # [N, M]
  precision = np.mean(np.any(d <= radii_real[:, None], axis=0))
  recall = np.mean(np.any(d <= radii_fake[None, :], axis=1))
  return precision, recall


# --- FID ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num, dim", [(200, 16), (10, 32)])  # full rank; rank-deficient
def test_frechet_distance_matches_pytorch_fid(num, dim):
  rng = np.random.default_rng(num)
  a = rng.normal(size=(num, dim))
  b = rng.normal(size=(num, dim)) * 1.3 + 0.2
  got = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
  want = reference_fid(*stats[0], *stats[1])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert want > 0.1


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_singular_product_takes_the_eps_path():
  # A nilpotent product has no square root by the Schur method (inf); both add eps to the
  # diagonals and agree on the result.
  sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
  assert not np.all(np.isfinite(scipy.linalg.sqrtm(sigma1 @ sigma2)))
  mu1, mu2 = np.array([1.0, 2.0]), np.array([0.5, -1.0])
  got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(got, reference_fid(mu1, sigma1, mu2, sigma2), rtol=1e-6)


def test_frechet_distance_raises_on_a_non_psd_covariance_as_pytorch_fid():
  args = (np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="imaginary"):
    reference_fid(*args)
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(*args)


# --- Inception Score -----------------------------------------------------------------------------


def _confident(classes, num_classes):
  """Logits that put all probability on `classes` (exp(-1000) underflows to exactly 0)."""
  return 1000.0 * np.eye(num_classes)[classes]


def test_inception_score_hand_cases():
  c = 4
  # Each class once, predicted with certainty: KL = log C for every sample, IS = C.
  np.testing.assert_allclose(metrics.inception_score(_confident(np.arange(c), c)), c, rtol=1e-12)
  # Every sample predicts the same distribution: KL = 0, IS = 1.
  same = np.tile(np.array([[0.3, -1.0, 2.0, 0.0]]), (6, 1))
  np.testing.assert_allclose(metrics.inception_score(same), 1.0, rtol=1e-12)
  # Two splits: a diverse one (C) and a collapsed one (1), averaged.
  two = np.concatenate([_confident(np.arange(c), c), _confident(np.zeros(c, int), c)])
  np.testing.assert_allclose(metrics.inception_score(two, split_size=c), (c + 1) / 2, rtol=1e-12)
  # One split over all 2C: the marginal is (C+1)/(2C) on class 0 and 1/(2C) elsewhere.
  p0, p1 = (c + 1) / (2 * c), 1 / (2 * c)
  mean_kl = (c + 1) / (2 * c) * np.log(1 / p0) + (c - 1) / (2 * c) * np.log(1 / p1)
  np.testing.assert_allclose(metrics.inception_score(two), np.exp(mean_kl), rtol=1e-12)


def test_inception_score_splits_of_5000_as_adm():
  # ADM cuts the samples in file order into splits of 5,000 (10 for 50,000).
  c = 4
  diverse = _confident(np.arange(5000) % c, c)
  collapsed = _confident(np.zeros(5000, int), c)
  got = metrics.inception_score(np.concatenate([diverse, collapsed]))
  np.testing.assert_allclose(got, (c + 1) / 2, rtol=1e-12)
  assert metrics.IS_SPLIT_SIZE == 5000


def test_inception_score_matches_adm_formula():
  logits = np.random.default_rng(0).normal(size=(23, 10)) * 3
  for split_size in (7, 23, 5000):
    np.testing.assert_allclose(
      metrics.inception_score(logits, split_size),
      reference_inception_score(logits, split_size),
      rtol=1e-12,
    )


# --- Precision and recall ----------------------------------------------------------------------


def _on_a_line(xs):
  """Points (x, 1): integer coordinates, so every squared distance is exact in float16."""
  xs = np.asarray(xs, np.float32)
  return np.stack([xs, np.ones_like(xs)], axis=1)


@pytest.mark.parametrize("distance_dtype", ["float16", "float32"])
@pytest.mark.parametrize("block_size", [3, metrics.PR_BLOCK_SIZE])
def test_manifold_radii_on_a_line(distance_dtype, block_size):
  # 0..9: the 3rd neighbour of an end point is 3 away, of any other point 2 away.
  radii = metrics.manifold_radii(_on_a_line(range(10)), 3, block_size, distance_dtype)
  np.testing.assert_array_equal(radii, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])


@pytest.mark.parametrize("distance_dtype", ["float16", "float32"])
@pytest.mark.parametrize("block_size", [3, metrics.PR_BLOCK_SIZE])
def test_precision_recall_hand_case(distance_dtype, block_size):
  # Real 0..9 covers [-3, 12]. Fake: two runs of 4 points with radii (3, 2, 2, 3), covering
  # [-3, 6] and [17, 26]. Precision: fakes 0..3 in, 20..23 out = 0.5. Recall: reals 0..6 in
  # (6 lies exactly on the ball of fake 3: on the surface counts), 7..9 out = 0.7.
  real = _on_a_line(range(10))
  fake = _on_a_line([0, 1, 2, 3, 20, 21, 22, 23])
  got = metrics.precision_recall(real, fake, 3, block_size, distance_dtype)
  assert got == (0.5, 0.7)
  assert reference_precision_recall(real, fake) == (0.5, 0.7)
  # Swapping the sets swaps precision and recall.
  assert metrics.precision_recall(fake, real, 3, block_size, distance_dtype) == (0.7, 0.5)


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(37, 8)).astype(np.float32)
  fake = (rng.normal(size=(29, 8)) * 1.4 + 0.3).astype(np.float32)
  want = reference_precision_recall(real, fake)
  assert 0 < want[0] < 1 and 0 < want[1] < 1
  for block_size in (5, 100):
    got = metrics.precision_recall(real, fake, block_size=block_size, distance_dtype="float32")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_float16_distances_fall_back_to_float32_on_overflow():
  # Squared distances of points 300 apart are 90,000, beyond float16 (65504): as ADM, that block
  # is computed in float32 (exactly, for these integers) instead of turning into inf.
  line = _on_a_line(np.arange(10) * 300.0)
  radii = metrics.manifold_radii(line, distance_dtype="float16")
  np.testing.assert_array_equal(radii, np.array([9, 4, 4, 4, 4, 4, 4, 4, 4, 9]) * 300.0**2)


def test_precision_recall_needs_more_than_k_points():
  with pytest.raises(ValueError, match="more than 3"):
    metrics.manifold_radii(_on_a_line(range(3)))


# --- The library over .npz files, with a stand-in featurizer ----------------------------------


class FakeFeaturizer:
  """Cheap features of 4x4x3 images, counting the images it saw."""

  def __init__(self):
    self.seen = 0

  def __call__(self, images):
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
    self.seen += len(images)
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0  # [n, 48]
    return {"pool": flat[:, :8], "spatial": flat[:, 8:20], "logits": 4.0 * flat[:, 20:30]}


def _never(images):
  raise AssertionError("featurized, but the cache should have answered")


def _images(n, seed=0, shape=(4, 4, 3)):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_npz_images_stream_in_chunks(tmp_path):
  images = _images(12)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, arr_0=images, labels=np.arange(12))
    chunks = list(fid.NpzImages(path).chunks(5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
  # As `--mode=sample` writes its samples: a stored zip64 member with a version 2.0 header.
  path = str(tmp_path / "samples.npz")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open("arr_0.npy", "w", force_zip64=True) as f:
      header = {"descr": "|u1", "fortran_order": False, "shape": images.shape}
      np.lib.format.write_array_header_2_0(f, header)
      f.write(images.tobytes())
  np.testing.assert_array_equal(np.concatenate(list(fid.NpzImages(path).chunks(5))), images)
  # A transposed array is saved in Fortran order and read whole instead.
  path = str(tmp_path / "fortran.npz")
  np.savez(path, arr_0=np.asfortranarray(images))
  np.testing.assert_array_equal(np.concatenate(list(fid.NpzImages(path).chunks(5))), images)


def test_grayscale_is_expanded(tmp_path):
  gray = _images(6, shape=(4, 4))
  path = str(tmp_path / "gray.npz")
  np.savez(path, arr_0=gray[..., None])
  rgb = np.concatenate(list(fid.NpzImages(path).chunks(4)))
  assert rgb.shape == (6, 4, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], gray)
  features = fid.featurize_images(gray, FakeFeaturizer())
  np.testing.assert_array_equal(features["pool"], FakeFeaturizer()(rgb)["pool"])


def test_reference_statistics_are_cached(tmp_path, monkeypatch):
  path = str(tmp_path / "ref.npz")
  np.savez(path, arr_0=_images(12))
  featurize = FakeFeaturizer()
  first = fid.reference_statistics(path, featurize, weights_id="w1", chunk_size=5)
  assert featurize.seen == 12 and first["num_images"] == 12
  features = FakeFeaturizer()(_images(12))
  mu, sigma = metrics.feature_statistics(features["pool"])
  np.testing.assert_allclose(first["mu"], mu, rtol=1e-12)
  np.testing.assert_allclose(first["sigma"], sigma, rtol=1e-12)
  np.testing.assert_array_equal(first["pool"], features["pool"])
  assert os.path.exists(str(tmp_path / "ref.dit_jax_stats.npz"))

  second = fid.reference_statistics(path, _never, weights_id="w1")
  for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
    np.testing.assert_array_equal(second[key], first[key])
  # Other weights: computed again.
  featurize = FakeFeaturizer()
  fid.reference_statistics(path, featurize, weights_id="w2")
  assert featurize.seen == 12
  # A damaged cache is computed again and replaced.
  with open(fid.cache_path(path), "wb") as f:
    f.write(b"not an npz")
  fid.reference_statistics(path, FakeFeaturizer(), weights_id="w2")
  fid.reference_statistics(path, _never, weights_id="w2")

  # A folder that cannot be written costs only the cache.
  os.remove(fid.cache_path(path))

  def read_only(*args, **kwargs):
    raise PermissionError("read-only file system")

  monkeypatch.setattr(storage, "write_bytes", read_only)  # Every write of the storage layer.
  third = fid.reference_statistics(path, FakeFeaturizer(), weights_id="w1")
  np.testing.assert_array_equal(third["sigma"], first["sigma"])
  assert not os.path.exists(fid.cache_path(path))


def test_score_against_itself_and_others(tmp_path):
  path = str(tmp_path / "ref.npz")
  images = _images(12)
  np.savez(path, arr_0=images)
  reference = fid.reference_statistics(path, FakeFeaturizer())
  same = fid.score(images, reference, FakeFeaturizer())
  assert set(same) == SCORE_KEYS
  scale = 2 * np.trace(reference["sigma"])
  assert abs(same["fid"]) <= 1e-6 * scale and abs(same["sfid"]) <= 1e-6 * scale
  assert same["precision"] == same["recall"] == 1.0
  assert same["num_samples"] == same["num_reference"] == 12

  other = _images(10, seed=1) // 2  # darker: a different distribution
  features = FakeFeaturizer()(other)
  scores = fid.score(other, reference, FakeFeaturizer())
  mu, sigma = metrics.feature_statistics(features["pool"])
  np.testing.assert_allclose(
    scores["fid"], reference_fid(mu, sigma, reference["mu"], reference["sigma"]), rtol=1e-6
  )
  np.testing.assert_allclose(
    scores["inception_score"], reference_inception_score(features["logits"], 5000), rtol=1e-12
  )
  want_pr = metrics.precision_recall(reference["pool"], features["pool"])
  assert (scores["precision"], scores["recall"]) == want_pr
  assert scores["num_samples"] == 10


def test_reference_statistics_from_the_file(tmp_path):
  # ADM's reference batches: stored statistics for FID and sFID, images for precision/recall.
  rng = np.random.default_rng(0)
  stats = {
    "mu": rng.normal(size=8),
    "sigma": np.eye(8) * 0.02,
    "mu_s": rng.normal(size=12),
    "sigma_s": np.eye(12) * 0.03,
  }
  both, only_stats = str(tmp_path / "both.npz"), str(tmp_path / "stats.npz")
  np.savez(both, arr_0=_images(12), **stats)
  np.savez(only_stats, **stats)
  for path in (both, only_stats):
    reference = fid.reference_statistics(path, FakeFeaturizer())
    for key, value in stats.items():
      np.testing.assert_array_equal(reference[key], value)
  assert reference["pool"] is None and reference["num_images"] is None
  samples = _images(10, seed=2)
  scores = fid.score(samples, reference, FakeFeaturizer())
  assert scores["precision"] is None and scores["recall"] is None
  assert scores["num_reference"] is None
  mu, sigma = metrics.feature_statistics(FakeFeaturizer()(samples)["pool"])
  np.testing.assert_allclose(
    scores["fid"], reference_fid(mu, sigma, stats["mu"], stats["sigma"]), rtol=1e-6
  )
  with_images = fid.reference_statistics(both, FakeFeaturizer())
  assert with_images["num_images"] == 12 and with_images["pool"].shape == (12, 8)


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_bad_files_raise_clear_errors(tmp_path):
  cases = {
    "nothing": (str(tmp_path / "missing.npz"), "no file"),
    "latents": (_write(tmp_path / "lat.npz", latents=np.zeros((4, 2, 2, 4))), "latents"),
    "float": (_write(tmp_path / "f.npz", arr_0=np.zeros((4, 4, 4, 3), np.float32)), "uint8"),
    "nchw": (_write(tmp_path / "c.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8)), "NHWC"),
    "channels": (_write(tmp_path / "c4.npz", arr_0=np.zeros((4, 8, 8, 4), np.uint8)), "3]"),
    "one": (_write(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8)), "at least 2"),
  }
  (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
  cases["junk"] = (str(tmp_path / "junk.npz"), "not a readable .npz")
  # Not "contains pickled (object) data", which np.load says of any file it cannot place.
  (tmp_path / "text.npz").write_text("this is not an npz\n")
  cases["text"] = (str(tmp_path / "text.npz"), r"not a zip archive \(it begins b'this is not an")
  np.save(tmp_path / "single.npy", _images(4))
  cases["npy"] = (str(tmp_path / "single.npy"), "not an .npz")
  for name, (path, fragment) in cases.items():
    with pytest.raises(ConfigError, match=fragment):
      fid.NpzImages(path)
    with pytest.raises(ConfigError, match=fragment if name != "latents" else "arr_0"):
      fid.reference_statistics(path, _never)
  partial = _write(tmp_path / "partial.npz", mu=np.zeros(8), sigma=np.eye(8))
  with pytest.raises(ConfigError, match="mu_s"):
    fid.reference_statistics(partial, _never)
  with pytest.raises(ConfigError, match="at least 2"):
    fid.score(_images(1), {}, _never)


def test_damaged_image_bytes_raise_a_clear_error(tmp_path):
  path = str(tmp_path / "damaged.npz")
  np.savez(path, arr_0=_images(12))
  data = bytearray((tmp_path / "damaged.npz").read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("arr_0.npy")
  middle = info.header_offset + 30 + len(info.filename) + 200  # inside the stored pixels
  data[middle] ^= 0xFF
  (tmp_path / "damaged.npz").write_bytes(bytes(data))
  with pytest.raises(ConfigError, match="damaged"):
    list(fid.NpzImages(path).chunks(12))


def test_samples_of_another_network_are_rejected(tmp_path):
  path = _write(
    tmp_path / "ref.npz", mu=np.zeros(5), sigma=np.eye(5), mu_s=np.zeros(3), sigma_s=np.eye(3)
  )
  reference = fid.reference_statistics(path, _never)
  with pytest.raises(ConfigError, match="another network"):
    fid.score(_images(6), reference, FakeFeaturizer())


# --- The command line, with random weights of the real Inception --------------------------------

MODULE = "dit_jax.evaluation.fid"


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("fid_cli")
  weights = str(root / "inception.npz")
  inception.random_weights(weights, seed=0)
  images = str(root / "images.npz")
  np.savez(images, arr_0=_images(20, shape=(32, 32, 3)), labels=np.arange(20))
  return root, weights, images


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.multiprocess  # Two 2048x2048 matrix square roots in a subprocess.
def test_cli_scores_a_set_against_itself_and_caches(cli_files):
  root, weights, images = cli_files
  out = str(root / "scores.json")
  args = [f"--reference={images}", f"--samples={images}", f"--inception={weights}"]
  args += [f"--out={out}", "--batch_size=20"]
  first = _cli.run(*args, module=MODULE)
  _cli.assert_quiet(first)
  assert first.returncode == 0, first.output[-3000:]
  scores = json.loads(_cli.last_line(first))
  assert set(scores) == SCORE_KEYS
  with open(out) as f:
    assert json.load(f) == scores
  cache = str(root / "images.dit_jax_stats.npz")
  assert os.path.exists(cache)
  with np.load(cache) as z:
    fid_scale = 2 * np.trace(z["sigma"])
    sfid_scale = 2 * np.trace(z["sigma_s"])
    assert z["pool"].shape == (20, 2048) and z["sigma_s"].shape == (2023, 2023)
  assert abs(scores["fid"]) <= 1e-6 * fid_scale
  assert abs(scores["sfid"]) <= 1e-6 * sfid_scale
  assert scores["precision"] == scores["recall"] == 1.0
  assert scores["num_samples"] == scores["num_reference"] == 20
  assert scores["inception_score"] >= 1.0

  # A second call reads the cache: the reference is never featurized again (a second CLI run
  # would spend its time in sqrtm, which the call above already covers).
  cached = _sha256(cache)

  def must_not_featurize(_):
    raise AssertionError("the reference was featurized again instead of read from the cache")

  again = fid.reference_statistics(
    str(images), must_not_featurize, weights_id=fid.weights_hash(str(weights))
  )
  with np.load(cache) as z:
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
      np.testing.assert_array_equal(again[key], z[key])
  assert _sha256(cache) == cached


@pytest.mark.multiprocess
@pytest.mark.parametrize(
  "case, fragment",
  [
    ("no_arr_0", "has no arr_0"),
    ("float_images", "must be uint8"),
    ("one_image", "at least 2 images"),
    ("missing_weights", "do not exist"),
    ("missing_npz", "There is no file"),
    ("corrupt_npz", "not a readable .npz"),
  ],
)
def test_cli_bad_input_ends_in_one_line(cli_files, tmp_path, case, fragment):
  _, weights, images = cli_files
  samples = str(tmp_path / "samples.npz")
  if case == "no_arr_0":
    np.savez(samples, labels=np.arange(4))
  elif case == "float_images":
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.float32))
  elif case == "one_image":
    np.savez(samples, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
  elif case == "corrupt_npz":
    with open(images, "rb") as f:
      (tmp_path / "samples.npz").write_bytes(f.read()[:3000])  # cut short
  elif case == "missing_weights":
    samples, weights = images, str(tmp_path / "nothing.pth")
  before = _cli.snapshot(str(tmp_path))
  proc = _cli.run(
    f"--reference={images}", f"--samples={samples}", f"--inception={weights}", module=MODULE
  )
  _cli.assert_clear_error(proc, fragment)
  assert _cli.snapshot(str(tmp_path)) == before
