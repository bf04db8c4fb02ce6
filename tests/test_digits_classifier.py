"""The shipped digits classifier and the metrics built on it."""

import os

import numpy as np
import pytest
import scipy.stats

from dit_jax.data.sources import heldout_split
from dit_jax.evaluation import metrics
from dit_jax.models import digits_cnn as dc
from dit_jax.tools import train_digits_classifier as trainer


@pytest.fixture(scope="module")
def classifier():
  return dc.load_classifier()


@pytest.fixture(scope="module")
def digits16():
  return trainer.load_real_digits(16)


@pytest.fixture(scope="module")
def real_features(classifier, digits16):
  return classifier.features(digits16[0])


def _softmax(logits):
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


# --- The shipped classifier ---------------------------------------------------------------------


def test_asset_is_small_and_describes_itself(classifier):
  assert os.path.getsize(dc.ASSET_PATH) < 1_000_000
  meta = classifier.metadata
  assert meta["image_size"] == 16
  assert meta["feature_dim"] == dc.FEATURE_DIM
  assert meta["val_accuracy"] >= 0.95


def test_real_digits_data_contract(digits16):
  images, labels = digits16
  assert images.shape == (1797, 16, 16, 1) and images.dtype == np.float32
  assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
  assert images.min() == -1.0 and images.max() == 1.0


def test_accuracy_on_all_real_digits(classifier, digits16):
  images, labels = digits16
  assert metrics.accuracy(classifier.predict(images), labels) >= 0.97


def test_accuracy_on_heldout_split(classifier, digits16):
  images, labels = digits16
  meta = classifier.metadata
  _, val_idx = heldout_split(len(labels), meta["val_fraction"], meta["split_seed"])
  assert len(val_idx) > 300
  assert metrics.accuracy(classifier.predict(images[val_idx]), labels[val_idx]) >= 0.95


@pytest.mark.parametrize("size,method", [(32, "linear"), (32, "cubic"), (8, "linear")])
def test_other_input_sizes(classifier, size, method):
  images, labels = trainer.load_real_digits(size, method)
  assert images.shape[1:] == (size, size, 1)
  assert metrics.accuracy(classifier.predict(images), labels) >= 0.95


@pytest.mark.parametrize("size", [16, 32])
def test_pil_bicubic_resize_of_the_data_pipeline(classifier, size):
  # The training data may be resized with PIL rather than jax.image; the classifier was trained
  # to be indifferent to that choice.
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = np.stack(
    [
      np.asarray(Image.fromarray(x / 8.0 - 1.0).resize((size, size), Image.BICUBIC))
      for x in digits.images.astype(np.float32)
    ]
  )
  images = np.clip(images, -1.0, 1.0)[..., None]  # [N, S, S, 1]
  assert metrics.accuracy(classifier.predict(images), digits.target) >= 0.97


def test_noise_and_blank_images_get_no_confident_class(classifier, digits16):
  images, _ = digits16
  rng = np.random.default_rng(0)
  n = 512
  noise = rng.uniform(-1.0, 1.0, (n, 16, 16, 1)).astype(np.float32)
  random_labels = rng.integers(0, 10, n)
  assert metrics.accuracy(classifier.predict(noise), random_labels) < 0.3
  blank = np.full((n, 16, 16, 1), -1.0, np.float32)
  real_confidence = _softmax(classifier.logits(images[:n])).max(axis=-1).mean()
  assert real_confidence > 0.9
  for junk in (noise, blank):
    assert _softmax(classifier.logits(junk)).max(axis=-1).mean() < 0.5


def test_outputs_do_not_depend_on_batching(classifier, digits16):
  images = digits16[0][:50]
  small_batches = dc.DigitsClassifier(classifier.params, batch_size=7)
  features = classifier.features(images)
  assert features.shape == (50, dc.FEATURE_DIM)
  np.testing.assert_allclose(small_batches.features(images), features, rtol=1e-5, atol=1e-5)
  assert classifier.logits(images).shape == (50, 10)
  assert classifier.predict(images[:0]).shape == (0,)


def test_bad_inputs_raise_clear_errors(classifier):
  with pytest.raises(ValueError, match="1 channel"):
    classifier.predict(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="NHWC"):
    classifier.predict(np.zeros((2, 16, 16), np.float32))
  with pytest.raises(ValueError, match="float"):
    classifier.predict(np.zeros((2, 16, 16, 1), np.uint8))


def test_missing_asset_says_how_to_regenerate(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dit_jax.tools.train_digits_classifier"):
    dc.load_classifier(str(tmp_path / "absent.npz"))


def test_save_load_roundtrip(classifier, digits16, tmp_path):
  path = str(tmp_path / "c.npz")
  dc.save_classifier(classifier, path)
  again = dc.load_classifier(path)
  assert again.metadata == classifier.metadata
  images = digits16[0][:20]
  np.testing.assert_array_equal(again.logits(images), classifier.logits(images))


def test_wrong_architecture_is_rejected(classifier):
  params = dict(classifier.params)
  params["features"] = {"kernel": np.zeros((512, 64)), "bias": np.zeros(64)}
  with pytest.raises(ValueError, match="architecture"):
    dc.DigitsClassifier(params)


def test_heldout_split_is_a_fixed_partition():
  train, val = heldout_split(1797, 0.2, seed=0)
  assert len(val) == 359 and len(np.intersect1d(train, val)) == 0
  np.testing.assert_array_equal(np.union1d(train, val), np.arange(1797))
  np.testing.assert_array_equal(heldout_split(1797, 0.2, seed=0)[1], val)
  assert not np.array_equal(heldout_split(1797, 0.2, seed=1)[1], val)


# --- Metrics ------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy():
  x = np.random.default_rng(0).normal(size=(100, 5))
  mu, sigma = metrics.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, np.cov(x.T))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_statistics(x[:1])
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    metrics.feature_statistics(x[:, 0])


def _random_diag_gaussians(rng, d):
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
  return mu1, s1, mu2, s2, expected


def test_frechet_distance_analytic_diagonal():
  mu1, s1, mu2, s2, expected = _random_diag_gaussians(np.random.default_rng(1), 16)
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_frechet_distance_is_rotation_invariant():
  # Rotating both Gaussians by the same orthogonal Q keeps the distance, and makes the
  # covariances dense, so this checks the non-diagonal path against the closed form.
  mu1, s1, mu2, s2, expected = _random_diag_gaussians(np.random.default_rng(2), 16)
  q = scipy.stats.ortho_group.rvs(16, random_state=3)
  got = metrics.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_frechet_distance_of_real_features(classifier, digits16, real_features):
  images, _ = digits16
  rng = np.random.default_rng(0)
  stats_real = metrics.feature_statistics(real_features)
  scale = np.trace(stats_real[1])
  assert metrics.frechet_distance(*stats_real, *stats_real) <= 1e-6 * scale

  noisy = (images + rng.normal(0.0, 0.05, images.shape)).astype(np.float32)
  noise = rng.uniform(-1.0, 1.0, images.shape).astype(np.float32)
  stats_noisy = metrics.feature_statistics(classifier.features(noisy))
  stats_noise = metrics.feature_statistics(classifier.features(noise))
  fd_noisy = metrics.frechet_distance(*stats_real, *stats_noisy)
  fd_noise = metrics.frechet_distance(*stats_real, *stats_noise)
  assert 0.0 < fd_noisy < fd_noise / 100
  np.testing.assert_allclose(
    metrics.frechet_distance(*stats_noise, *stats_real), fd_noise, rtol=1e-6
  )


def test_frechet_distance_handles_singular_covariances():
  # Fewer samples than dimensions: both covariances are rank deficient.
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 1.0
  fd = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  assert np.isfinite(fd) and fd > 0.0


def test_frechet_distance_rejects_bad_inputs():
  with pytest.raises(ValueError, match="imaginary"):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="Covariances"):
    metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="Means"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))


def test_accuracy():
  assert metrics.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
  with pytest.raises(ValueError, match="both be"):
    metrics.accuracy(np.array([1, 2]), np.array([1, 2, 3]))
