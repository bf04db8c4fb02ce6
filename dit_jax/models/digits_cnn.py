"""The digits classifier that scores generated samples, and its shipped weights.

A small CNN trained on the 1,797 real 8x8 digits of scikit-learn, upsampled to 16x16 and scaled
to [-1, 1]. Its predictions give `class_accuracy` and its `features` layer is the space of the
Fréchet distance. Inputs of any other size (8, 32, ...) are resized to 16x16 first, so one set of
weights serves every `digits` config.

Its trainer, which also regenerates the shipped weights, is `dit_jax.tools.train_digits_classifier`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dit_jax import storage

IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 128
ASSET_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "assets", "digits_classifier.npz"
)
REGENERATE_COMMAND = (
  "python -m dit_jax.tools.train_digits_classifier "
  "--out=dit_jax/models/assets/digits_classifier.npz"
)
# Bumped when the architecture or the npz layout changes, so stale assets fail loudly.
FORMAT_VERSION = 1

_PARAM_PREFIX = "params/"
_META_PREFIX = "meta/"


class DigitsCNN(nn.Module):
  """Three 3x3 convolutions, two poolings, a dense feature layer and the class logits.

  The submodule names (conv1..conv3, features, logits) are the keys of the shipped npz.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Maps [N, 16, 16, 1] images in [-1, 1] to (features [N, 128], logits [N, 10])."""
    assert x.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 1), x.shape
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # [N, 8, 8, 32]
    x = nn.relu(nn.Conv(32, (3, 3), name="conv3")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # [N, 4, 4, 32]
    x = x.reshape(x.shape[0], -1)  # [N, 512]
    # Features are taken before the ReLU: no dead (constant) coordinates, so the covariance of
    # the Fréchet distance stays full rank, and the values are closer to Gaussian.
    features = nn.Dense(FEATURE_DIM, name="features")(x)  # [N, 128]
    logits = nn.Dense(NUM_CLASSES, name="logits")(nn.relu(features))  # [N, 10]
    return features, logits


def preprocess(images: jax.Array) -> jax.Array:
  """Brings NHWC grayscale images in [-1, 1] of any size to the classifier's [N, 16, 16, 1].

  Values are clipped to [-1, 1], as a sampler's output is before it is saved as an image.
  Other sizes are resized with antialiased bilinear interpolation.

  Args:
    images: [N, H, W, 1] float images in [-1, 1].

  Returns:
    [N, 16, 16, 1] float32 images.
  """
  if images.ndim != 4:
    raise ValueError(f"Expected NHWC images [N, H, W, 1], got shape {tuple(images.shape)}.")
  if images.shape[-1] != 1:
    raise ValueError(
      f"The digits classifier takes grayscale images with 1 channel, got {images.shape[-1]} "
      f"channels (shape {tuple(images.shape)}); set data.channels=1 for the digits dataset."
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f"Expected float images in [-1, 1], got dtype {images.dtype}; scale uint8 images with "
      "x / 127.5 - 1 first."
    )
  x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    x = jax.image.resize(
      x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), method="linear", antialias=True
    )  # [N, 16, 16, 1]
  return x


@jax.jit
def _forward(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  return DigitsCNN().apply({"params": params}, preprocess(images))


def _param_shapes() -> Any:
  """Shapes of the architecture's parameters, without running anything."""
  dummy = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
  return jax.eval_shape(DigitsCNN().init, jax.random.key(0), dummy)["params"]


class DigitsClassifier:
  """Trained classifier weights plus batched, jitted inference.

  Every method takes [N, H, W, 1] float images in [-1, 1] (numpy or jax) and returns numpy.
  """

  def __init__(self, params: Any, metadata: Mapping[str, Any] | None = None, batch_size: int = 512):
    """Wraps a parameter tree of `DigitsCNN`.

    Args:
      params: the `params` collection of `DigitsCNN`.
      metadata: how the weights were made (validation accuracy, seed, split, ...).
      batch_size: images per forward pass; the last batch is padded so that nothing recompiles.
    """
    expected = _param_shapes()
    got_shapes = [np.shape(a) for a in jax.tree.leaves(params)]
    expected_shapes = [s.shape for s in jax.tree.leaves(expected)]
    if jax.tree.structure(params) != jax.tree.structure(expected) or got_shapes != expected_shapes:
      raise ValueError(
        "Classifier parameters do not match the DigitsCNN architecture; regenerate them with: "
        f"{REGENERATE_COMMAND}"
      )
    self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    self.metadata = dict(metadata or {})
    self.batch_size = batch_size

  def _run(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    images = jnp.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"Expected NHWC images [N, H, W, 1], got shape {tuple(images.shape)}.")
    n = images.shape[0]
    if n == 0:
      return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    features, logits = [], []
    for start in range(0, n, self.batch_size):
      batch = images[start : start + self.batch_size]
      pad = self.batch_size - batch.shape[0]
      if pad:
        batch = jnp.concatenate([batch, -jnp.ones((pad,) + batch.shape[1:], batch.dtype)])
      batch_features, batch_logits = _forward(self.params, batch)
      features.append(np.asarray(batch_features[: self.batch_size - pad]))
      logits.append(np.asarray(batch_logits[: self.batch_size - pad]))
    return np.concatenate(features), np.concatenate(logits)

  def features(self, images: Any) -> np.ndarray:
    """Feature vectors for the Fréchet distance, [N, 128] float32."""
    return self._run(images)[0]

  def logits(self, images: Any) -> np.ndarray:
    """Class logits, [N, 10] float32."""
    return self._run(images)[1]

  def predict(self, images: Any) -> np.ndarray:
    """Predicted class labels, [N] int32."""
    return np.argmax(self.logits(images), axis=-1).astype(np.int32)


def load_classifier(path: str | None = None) -> DigitsClassifier:
  """Loads the shipped classifier (or the npz at `path`).

  Args:
    path: an npz written by `save_classifier`; defaults to the asset shipped with the package.

  Returns:
    The classifier, with the npz's metadata in `.metadata`.
  """
  path = path or ASSET_PATH
  if not storage.isfile(path):
    raise FileNotFoundError(
      f"Digits classifier weights not found at {path}. Regenerate them with: {REGENERATE_COMMAND}"
    )
  data = storage.load_npz(path)
  flat = {k[len(_PARAM_PREFIX) :]: v for k, v in data.items() if k.startswith(_PARAM_PREFIX)}
  metadata = {
    k[len(_META_PREFIX) :]: v.item() for k, v in data.items() if k.startswith(_META_PREFIX)
  }
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(
      f"{path} has format_version {version}, this code expects {FORMAT_VERSION}. Regenerate it "
      f"with: {REGENERATE_COMMAND}"
    )
  params = traverse_util.unflatten_dict(flat, sep="/")
  return DigitsClassifier(params, metadata)


def save_classifier(classifier: DigitsClassifier, path: str) -> None:
  """Writes the parameters (keys `params/<module>/<name>`) and metadata (`meta/<key>`) to npz."""
  flat = traverse_util.flatten_dict(jax.device_get(classifier.params), sep="/")
  arrays = {_PARAM_PREFIX + k: np.asarray(v, np.float32) for k, v in flat.items()}
  meta = dict(classifier.metadata, format_version=FORMAT_VERSION)
  arrays.update({_META_PREFIX + k: np.asarray(v) for k, v in meta.items()})
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  storage.write_bytes(path, buffer.getvalue())  # Atomic: never a truncated asset.
