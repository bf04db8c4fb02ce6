"""Sample-quality metrics over classifier outputs: pure numpy/scipy, no JAX.

The Fréchet distance is the FID formula (Heusel et al., 2017) applied to whatever feature space
the caller picks; `dit_jax` uses the features of the shipped digits classifier.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from absl import logging

# Imaginary parts of sqrtm(sigma1 @ sigma2) come from round-off when the product is nearly
# singular; anything above this (relative to the largest entry) means the inputs were not
# covariance matrices, and hiding it would report a wrong distance.
_MAX_RELATIVE_IMAG = 1e-3


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

  d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

  Args:
    mu1: [D] mean of the first set.
    sigma1: [D, D] covariance of the first set.
    mu2: [D] mean of the second set.
    sigma2: [D, D] covariance of the second set.
    eps: offset added to both diagonals when sigma1 @ sigma2 is too singular for sqrtm.

  Returns:
    The squared Fréchet distance (the quantity FID reports), a Python float.

  Raises:
    ValueError: on mismatched shapes, or if the matrix square root keeps a large imaginary part
      (the covariances were not symmetric positive semi-definite).
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
    max_imag = np.max(np.abs(covmean.imag))
    scale = max(np.max(np.abs(covmean.real)), np.finfo(np.float64).tiny)
    if max_imag > _MAX_RELATIVE_IMAG * scale:
      raise ValueError(
        f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary part of {max_imag:.3g} "
        f"(relative {max_imag / scale:.3g}); the covariances must be symmetric positive "
        "semi-definite (use feature_statistics to compute them)."
      )
    covmean = covmean.real

  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  # Round-off can push a zero distance a hair below 0; a negative squared distance means nothing.
  return float(max(distance, 0.0))


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
