"""The digits classifier that scores generated samples, its shipped weights, and its trainer.

A small CNN trained on the 1,797 real 8x8 digits of scikit-learn, upsampled to 16x16 and scaled
to [-1, 1]. Its predictions give `class_accuracy` and its `features` layer is the space of the
Fréchet distance. Inputs of any other size (8, 32, ...) are resized to 16x16 first, so one set of
weights serves every `digits` config.

Regenerate the shipped weights (one to two minutes on 2 CPU cores; same --seed, same weights):

  python -m dit_jax.evaluation.digits_classifier \
      --out=dit_jax/evaluation/assets/digits_classifier.npz
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from dit_jax import storage
from dit_jax.data.sources import heldout_split

IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 128
ASSET_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "assets", "digits_classifier.npz"
)
REGENERATE_COMMAND = (
  "python -m dit_jax.evaluation.digits_classifier "
  "--out=dit_jax/evaluation/assets/digits_classifier.npz"
)
# Canonical resize of the 8x8 digits for training and validation. Bilinear never overshoots the
# [-1, 1] range (bicubic does); the trainer also shows nearest and bicubic versions so that the
# dataset module's own choice of resize does not matter.
TRAIN_RESIZE_METHOD = "linear"
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


def load_real_digits(
  image_size: int = IMAGE_SIZE, method: str = TRAIN_RESIZE_METHOD
) -> tuple[np.ndarray, np.ndarray]:
  """The 1,797 scikit-learn digits as [N, S, S, 1] float32 in [-1, 1] (0 -> -1, 16 -> +1).

  Args:
    image_size: side of the output images; 8 keeps the originals.
    method: `jax.image.resize` method for the upsampling (antialiased).

  Returns:
    (images [1797, S, S, 1] float32, labels [1797] int32).
  """
  from sklearn.datasets import load_digits  # Only the trainer and tests need scikit-learn.

  digits = load_digits()
  images = digits.images.astype(np.float32) / 8.0 - 1.0  # [N, 8, 8]
  images = images[..., None]  # [N, 8, 8, 1]
  if image_size != images.shape[1]:
    images = jax.image.resize(
      images, (images.shape[0], image_size, image_size, 1), method=method, antialias=True
    )  # [N, S, S, 1]
    # Cubic and Lanczos kernels overshoot; the data range is [-1, 1] by contract.
    images = np.clip(np.asarray(images), -1.0, 1.0)
  return images.astype(np.float32), digits.target.astype(np.int32)


def _training_views(images_8: np.ndarray) -> np.ndarray:
  """Several 16x16 renderings of the same 8x8 digits, [V, N, 16, 16, 1].

  The dataset module and the 32-pixel configs may upsample differently; training on nearest,
  bilinear and bicubic versions, and on 32-pixel versions brought back by `preprocess`, makes
  the classifier agnostic to that choice.
  """
  n = images_8.shape[0]
  views = []
  for method in ("nearest", "linear", "cubic"):
    views.append(jax.image.resize(images_8, (n, IMAGE_SIZE, IMAGE_SIZE, 1), method=method))
  for method in ("linear", "cubic"):
    big = jax.image.resize(images_8, (n, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 1), method=method)
    views.append(preprocess(jnp.clip(big, -1.0, 1.0)))
  return np.clip(np.stack([np.asarray(v) for v in views]), -1.0, 1.0)  # [V, N, 16, 16, 1]


def _blur(x: jax.Array) -> jax.Array:
  """A separable [1, 2, 1] / 4 blur of [N, H, W, 1] images, background (-1) outside."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  h = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
  return 0.25 * h[:, :, :-2] + 0.5 * h[:, :, 1:-1] + 0.25 * h[:, :, 2:]


def _augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Light, label-preserving jitter of [N, 16, 16, 1] digits: shift, blur, contrast, noise."""
  n = x.shape[0]
  k_shift, k_blur, k_mix, k_gain, k_bias, k_std, k_noise = jax.random.split(key, 7)
  # Random shift of up to one pixel each way: pad with background, then crop.
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(k_shift, (n, 2), 0, 3)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), x.shape[1:])
  x = jax.vmap(crop)(padded, offsets)
  # Slight blur on a third of the images, by a random amount.
  amount = jax.random.uniform(k_mix, (n, 1, 1, 1)) * (
    jax.random.uniform(k_blur, (n, 1, 1, 1)) < 0.3
  )
  x = x + amount * (_blur(x) - x)
  # Contrast and brightness jitter that keeps the background near -1.
  gain = jax.random.uniform(k_gain, (n, 1, 1, 1), minval=0.75, maxval=1.25)
  bias = jax.random.uniform(k_bias, (n, 1, 1, 1), minval=-0.15, maxval=0.15)
  x = gain * (x + 1.0) - 1.0 + bias
  std = jax.random.uniform(k_std, (n, 1, 1, 1), maxval=0.15)
  return x + std * jax.random.normal(k_noise, x.shape)


def _noise_images(key: jax.Array, n: int) -> jax.Array:
  """Digit-free images, [N, 16, 16, 1]: white uniform, white Gaussian, blurred noise or blank.

  Blank images lean towards the background level -1, the typical output of a collapsed sampler,
  which the classifier would otherwise read confidently as a thin "1".
  """
  k_kind, k_uniform, k_normal, k_scale, k_level, k_grain = jax.random.split(key, 6)
  shape = (n, IMAGE_SIZE, IMAGE_SIZE, 1)
  uniform = jax.random.uniform(k_uniform, shape, minval=-1.0, maxval=1.0)
  scale = jax.random.uniform(k_scale, (n, 1, 1, 1), minval=0.2, maxval=1.0)
  normal = jnp.clip(scale * jax.random.normal(k_normal, shape), -1.0, 1.0)
  blurred = jnp.clip(3.0 * _blur(_blur(normal)), -1.0, 1.0)
  level = -1.0 + 2.0 * jax.random.uniform(k_level, (n, 1, 1, 1)) ** 2
  blank = level + 0.1 * scale * jax.random.normal(k_grain, shape)
  kind = jax.random.randint(k_kind, (n, 1, 1, 1), 0, 4)
  return jnp.select([kind == 0, kind == 1, kind == 2], [uniform, normal, blurred], blank)


def train_classifier(
  seed: int = 0,
  num_steps: int = 800,
  batch_size: int = 128,
  learning_rate: float = 2e-3,
  weight_decay: float = 1e-4,
  val_fraction: float = 0.2,
  split_seed: int = 0,
  noise_fraction: float = 0.125,
) -> DigitsClassifier:
  """Trains the digits classifier on the training split of the real digits.

  The returned model is the one trained on the training split only (it is not retrained on
  all images), so the validation accuracy in its metadata stays an honest held-out estimate.
  A `noise_fraction` of each batch is digit-free noise with a uniform target over the classes
  (outlier exposure): samples that show no digit then get no confident class.

  Args:
    seed: seed of the initialization, batch sampling and augmentation; same seed, same weights.
    num_steps: optimizer steps.
    batch_size: digits per batch (noise images come on top).
    learning_rate: peak learning rate of the warmup-cosine AdamW schedule.
    weight_decay: AdamW weight decay.
    val_fraction: fraction of the digits held out for validation.
    split_seed: seed of the held-out split (see `heldout_split`).
    noise_fraction: noise images per digit image in each batch.

  Returns:
    The trained classifier; `.metadata` holds the accuracies, the settings and the train time.
  """
  start_time = time.time()
  images_8, labels = load_real_digits(image_size=8)
  train_idx, val_idx = heldout_split(labels.shape[0], val_fraction, split_seed)
  views = jnp.asarray(_training_views(images_8[train_idx]))  # [V, N_train, 16, 16, 1]
  train_labels = jnp.asarray(labels[train_idx])
  num_views, num_train = views.shape[:2]
  num_noise = max(1, int(round(batch_size * noise_fraction)))

  init_key, base_key = jax.random.split(jax.random.key(seed))
  params = DigitsCNN().init(init_key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup_steps=min(100, num_steps // 10), decay_steps=num_steps
  )
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    key = jax.random.fold_in(base_key, step)
    k_idx, k_view, k_aug, k_noise = jax.random.split(key, 4)
    idx = jax.random.randint(k_idx, (batch_size,), 0, num_train)
    view = jax.random.randint(k_view, (batch_size,), 0, num_views)
    digits = _augment(k_aug, views[view, idx])  # [B, 16, 16, 1]
    x = jnp.concatenate([digits, _noise_images(k_noise, num_noise)])  # [B + B_noise, 16, 16, 1]
    targets = jnp.concatenate(
      [
        jax.nn.one_hot(train_labels[idx], NUM_CLASSES),
        jnp.full((num_noise, NUM_CLASSES), 1.0 / NUM_CLASSES),
      ]
    )  # [B + B_noise, 10]

    def loss_fn(p):
      _, logits = DigitsCNN().apply({"params": p}, x)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(num_steps):
    params, opt_state, loss = train_step(params, opt_state, step)
    if (step + 1) % 250 == 0 or step + 1 == num_steps:
      logging.info("digits classifier step %d/%d loss %.4f", step + 1, num_steps, float(loss))

  classifier = DigitsClassifier(params)
  images_16, _ = load_real_digits(IMAGE_SIZE)
  images_32, _ = load_real_digits(2 * IMAGE_SIZE)
  val_accuracy = float(np.mean(classifier.predict(images_16[val_idx]) == labels[val_idx]))
  val_accuracy_32 = float(np.mean(classifier.predict(images_32[val_idx]) == labels[val_idx]))
  train_accuracy = float(np.mean(classifier.predict(images_16[train_idx]) == labels[train_idx]))
  classifier.metadata = dict(
    val_accuracy=val_accuracy,
    val_accuracy_32=val_accuracy_32,
    train_accuracy=train_accuracy,
    image_size=IMAGE_SIZE,
    feature_dim=FEATURE_DIM,
    train_resize_method=TRAIN_RESIZE_METHOD,
    seed=seed,
    num_steps=num_steps,
    batch_size=batch_size,
    learning_rate=learning_rate,
    val_fraction=val_fraction,
    split_seed=split_seed,
    train_time_s=time.time() - start_time,
  )
  logging.info("digits classifier: %s", classifier.metadata)
  return classifier


def _main(argv: list[str]) -> None:
  del argv
  classifier = train_classifier(seed=_FLAGS.seed, num_steps=_FLAGS.num_steps)
  save_classifier(classifier, _FLAGS.out)
  meta = classifier.metadata
  print(
    f"validation accuracy {meta['val_accuracy']:.4f} (16px), {meta['val_accuracy_32']:.4f} "
    f"(32px); train accuracy {meta['train_accuracy']:.4f}; trained in "
    f"{meta['train_time_s']:.1f} s; wrote {_FLAGS.out} ({storage.getsize(_FLAGS.out)} bytes)"
  )


if __name__ == "__main__":
  from absl import app, flags

  from dit_jax import xla_flags

  xla_flags.apply()
  # Flags are defined only when run as a program: importing this module from a trainer must not
  # add `--out` or `--seed` to the trainer's flags.
  flags.DEFINE_string("out", ASSET_PATH, "Where to write the npz.")
  flags.DEFINE_integer("seed", 0, "Training seed.")
  flags.DEFINE_integer("num_steps", 800, "Optimizer steps.")
  _FLAGS = flags.FLAGS
  app.run(_main)
