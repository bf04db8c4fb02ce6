"""Sample-quality metrics over network features, as ADM's evaluation suite computes them.

- `frechet_distance` (FID, sFID): pytorch-fid's `calculate_frechet_distance` (the formula of
  Heusel et al., 2017, in float64 with scipy's sqrtm), over any feature space: the FID Inception's
  pool features (FID) or its spatial features (sFID), or the digits classifier's features.
- `inception_score`: ADM's `compute_inception_score` (splits of 5,000 samples in file order).
- `precision_recall`: improved precision and recall (Kynkäänniemi et al., 2019) as ADM's
  `ManifoldEstimator` computes them: k-NN radii of squared distances, blocked pairwise distances,
  float16 with a float32 fallback. The distances run in JAX; everything else is numpy on the host.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from absl import logging

# pytorch-fid and ADM accept sqrtm(sigma1 @ sigma2) while the imaginary parts of its diagonal
# (round-off of a nearly singular product) stay below this, in absolute terms.
_MAX_DIAGONAL_IMAG = 1e-3
# ADM's ManifoldEstimator: k of the k-NN radii, and the rows/columns of one block of distances.
PR_NEIGHBORHOOD = 3
PR_BLOCK_SIZE = 10000
# ADM's compute_inception_score: one score per this many samples, averaged.
IS_SPLIT_SIZE = 5000


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a set of feature vectors, in float64.

  Args:
    features: [N, D] features, N >= 2.

  Returns:
    (mu [D], sigma [D, D]) with the unbiased (N - 1) covariance, as in FID.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}.")
  if features.shape[0] < 2:
    raise ValueError(
      f"Need at least 2 feature vectors to estimate a covariance, got {features.shape[0]}."
    )
  if not np.all(np.isfinite(features)):
    raise ValueError("features contain NaN or inf; the samples they came from are broken.")
  mu = features.mean(axis=0)  # [D]
  sigma = np.cov(features, rowvar=False)  # [D, D]
  return mu, np.atleast_2d(sigma)


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  eps: float = 1e-6,
) -> float:
  """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed as pytorch-fid's
  `calculate_frechet_distance` (and ADM's `FIDStatistics.frechet_distance`) do, in float64.

  Args:
    mu1: [D] mean of the first set.
    sigma1: [D, D] covariance of the first set.
    mu2: [D] mean of the second set.
    sigma2: [D, D] covariance of the second set.
    eps: offset added to both diagonals when sigma1 @ sigma2 is too singular for sqrtm.

  Returns:
    The squared Fréchet distance (the quantity FID reports), a Python float.

  Raises:
    ValueError: on mismatched shapes, or if the diagonal of the matrix square root has an
      imaginary part above 1e-3 (the covariances were not symmetric positive semi-definite).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"Means must be [D] of the same D, got {mu1.shape} and {mu2.shape}.")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f"Covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and {sigma2.shape}."
    )

  diff = mu1 - mu2
  with warnings.catch_warnings():
    # A singular product is handled just below, as pytorch-fid's sqrtm(..., disp=False) does.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    # A rank-deficient product (fewer samples than dimensions, dead features) can defeat the
    # Schur method; a small ridge on both covariances makes it well posed and moves d^2 by O(eps).
    logging.warning(
      "frechet_distance: sigma1 @ sigma2 is singular; adding %g to the diagonals.", eps
    )
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.all(np.isfinite(covmean)):
      raise ValueError(
        "frechet_distance: the matrix square root is not finite even after adding "
        f"eps={eps} to the diagonals; check the covariances for NaN/inf."
      )

  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > _MAX_DIAGONAL_IMAG:
      raise ValueError(
        f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary part of {max_imag:.3g} on "
        "its diagonal; the covariances must be symmetric positive semi-definite (use "
        "feature_statistics to compute them)."
      )
    covmean = covmean.real

  # Not clipped at 0: a set against itself may come out a hair below 0, as in pytorch-fid and ADM.
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  return float(distance)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """Inception Score of samples from their classifier logits, as ADM's evaluator computes it.

  The samples are cut, in order, into splits of `split_size` (the last may be shorter); each
  split scores exp(mean_i KL(p(y|x_i) || mean_j p(y|x_j))) and the scores are averaged. ADM's
  50,000 samples make 10 splits. The softmax is taken here in float64 and in log space (ADM:
  float32), which only avoids log(0) (a NaN score in ADM) where probabilities underflow.

  Args:
    logits: [N, C] logits of the classifier (for the FID Inception: the 1008 logits of pool3
      times the softmax weights, without the bias, as ADM and torch-fidelity take them).
    split_size: samples per split.

  Returns:
    The mean over splits of the split scores, a Python float.
  """
  logits = np.asarray(logits, dtype=np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"logits must be [N, C] with N >= 1, got shape {logits.shape}.")
  if split_size < 1:
    raise ValueError(f"split_size must be >= 1, got {split_size}.")
  log_p = scipy.special.log_softmax(logits, axis=1)  # [N, C]
  scores = []
  for start in range(0, logits.shape[0], split_size):
    part_log_p = log_p[start : start + split_size]
    # log of the mean probability, in log space: finite even where every p underflows to 0.
    log_marginal = scipy.special.logsumexp(part_log_p, axis=0, keepdims=True) - np.log(
      part_log_p.shape[0]
    )  # [1, C]
    kl = np.sum(np.exp(part_log_p) * (part_log_p - log_marginal), axis=1)  # [n]
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores))


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """[R, D], [C, D] -> [R, C] squared Euclidean distances, in the inputs' dtype, as ADM does."""
  norm_u = jnp.sum(jnp.square(u), axis=1)[:, None]  # [R, 1]
  norm_v = jnp.sum(jnp.square(v), axis=1)[None, :]  # [1, C]
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)  # [R, C]
  return jnp.maximum(norm_u - 2 * uv + norm_v, 0)


def _block_distances(u: jax.Array, v: jax.Array, half: bool) -> jax.Array:
  """Float32 [R, C] squared distances; with `half`, ADM's: float16 unless a value overflows."""
  if not half:
    return _squared_distances(u, v)
  d16 = _squared_distances(u.astype(jnp.float16), v.astype(jnp.float16))
  return jax.lax.cond(
    jnp.all(jnp.isfinite(d16)),
    lambda: d16.astype(jnp.float32),
    lambda: _squared_distances(u, v),
  )


@functools.partial(jax.jit, static_argnames=("num", "half"))
def _merge_nearest(best: jax.Array, rows: jax.Array, cols: jax.Array, num: int, half: bool):
  """The `num` smallest squared distances of each row among `best` [R, num] and the columns."""
  d = _block_distances(rows, cols, half)  # [R, C]
  candidates = jnp.concatenate([best, d], axis=1)  # [R, num + C]
  return -jax.lax.top_k(-candidates, num)[0]


@functools.partial(jax.jit, static_argnames=("half",))
def _in_balls(a: jax.Array, radii_a: jax.Array, b: jax.Array, radii_b: jax.Array, half: bool):
  """Which rows of `a` lie in a ball of `b` ([R] bool) and which rows of `b` in one of `a` ([C])."""
  d = _block_distances(a, b, half)  # [R, C]
  return jnp.any(d <= radii_b[None, :], axis=1), jnp.any(d <= radii_a[:, None], axis=0)


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
  features = np.asarray(features, dtype=np.float32)
  if features.ndim != 2:
    raise ValueError(f"{name} must be [N, D], got shape {features.shape}.")
  return features


def manifold_radii(
  features: np.ndarray,
  k: int = PR_NEIGHBORHOOD,
  block_size: int = PR_BLOCK_SIZE,
  distance_dtype: str = "float16",
) -> np.ndarray:
  """Squared distance of every feature vector to its k-th nearest neighbour in the set.

  As ADM's `ManifoldEstimator.manifold_radii`: the (k+1)-th smallest squared distance of each row
  (the first is the row itself), computed in blocks of `block_size` rows and columns.

  Args:
    features: [N, D] feature vectors, N > k.
    k: the neighbourhood size.
    block_size: rows and columns of one block of pairwise distances (memory vs. speed).
    distance_dtype: "float16" (ADM: float16 distances, float32 for a block that overflows) or
      "float32".

  Returns:
    [N] float32 squared radii.
  """
  features = _check_features(features, "features")
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors, got {n}.")
  half = _half(distance_dtype)
  x = jnp.asarray(features)
  radii = []
  for r0 in range(0, n, block_size):
    rows = x[r0 : r0 + block_size]
    best = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)  # [R, k + 1]
    for c0 in range(0, n, block_size):
      best = _merge_nearest(best, rows, x[c0 : c0 + block_size], k + 1, half)
    radii.append(np.asarray(best[:, k]))
  return np.concatenate(radii)


def precision_recall(
  real_features: np.ndarray,
  fake_features: np.ndarray,
  k: int = PR_NEIGHBORHOOD,
  block_size: int = PR_BLOCK_SIZE,
  distance_dtype: str = "float16",
) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al., 2019), as ADM's `compute_prec_recall`.

  Each set's manifold is the union of balls around its points with their k-NN radii. Precision:
  the fraction of fake points inside the real manifold; recall: the fraction of real points
  inside the fake manifold (a point on a ball's surface is inside).

  Args:
    real_features: [N, D] features of the reference images (ADM: pool features), N > k.
    fake_features: [M, D] features of the samples, M > k.
    k: the neighbourhood size (ADM: 3).
    block_size: rows and columns of one block of pairwise distances.
    distance_dtype: "float16" (as ADM) or "float32"; see `manifold_radii`.

  Returns:
    (precision, recall), Python floats in [0, 1].
  """
  real = _check_features(real_features, "real_features")
  fake = _check_features(fake_features, "fake_features")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(
      f"real and fake features must have the same width, got {real.shape} and {fake.shape}."
    )
  half = _half(distance_dtype)
  radii_real = jnp.asarray(manifold_radii(real, k, block_size, distance_dtype))
  radii_fake = jnp.asarray(manifold_radii(fake, k, block_size, distance_dtype))
  x_real, x_fake = jnp.asarray(real), jnp.asarray(fake)
  real_in = np.zeros(real.shape[0], bool)  # real points inside the fake manifold
  fake_in = np.zeros(fake.shape[0], bool)  # fake points inside the real manifold
  for r0 in range(0, real.shape[0], block_size):
    r1 = r0 + block_size
    for f0 in range(0, fake.shape[0], block_size):
      f1 = f0 + block_size
      a_in, b_in = _in_balls(
        x_real[r0:r1], radii_real[r0:r1], x_fake[f0:f1], radii_fake[f0:f1], half
      )
      real_in[r0:r1] |= np.asarray(a_in)
      fake_in[f0:f1] |= np.asarray(b_in)
  return float(np.mean(fake_in)), float(np.mean(real_in))


def _half(distance_dtype: str) -> bool:
  if distance_dtype not in ("float16", "float32"):
    raise ValueError(f"distance_dtype must be 'float16' or 'float32', got {distance_dtype!r}.")
  return distance_dtype == "float16"


def accuracy(pred_labels: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of predictions equal to the labels.

  Args:
    pred_labels: [N] predicted integer labels.
    labels: [N] true integer labels.

  Returns:
    The accuracy in [0, 1].
  """
  pred_labels = np.asarray(pred_labels)
  labels = np.asarray(labels)
  if pred_labels.shape != labels.shape or pred_labels.ndim != 1:
    raise ValueError(
      f"pred_labels and labels must both be [N], got {pred_labels.shape} and {labels.shape}."
    )
  if labels.shape[0] == 0:
    raise ValueError("accuracy of an empty set is undefined.")
  return float(np.mean(pred_labels == labels))


def within_class_distance(features: np.ndarray, labels: np.ndarray) -> float:
  """Mean Euclidean distance between two different samples of the same class, averaged over the
  classes with at least two samples: the diversity of a conditional generator within a class
  (CADS, Sadat et al. 2024, measure diversity this way). Compare it with the real data's.

  Args:
    features: [N, D] features (e.g. the digits classifier's).
    labels: [N] integer labels.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
      f"features [N, D] and labels [N] expected, got {features.shape}, {labels.shape}."
    )
  per_class = []
  for k in np.unique(labels):
    f = features[labels == k]
    if len(f) < 2:
      continue
    sq = np.sum(f**2, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    n = len(f)
    per_class.append(np.sum(np.sqrt(d2)) / (n * (n - 1)))  # The diagonal is 0.
  if not per_class:
    raise ValueError("within_class_distance needs a class with at least two samples.")
  return float(np.mean(per_class))
