"""Trains the digits classifier whose weights ship with the package (`models.digits_cnn`), on the
1,797 real 8x8 digits of scikit-learn, and writes them.

  python -m dit_jax.tools.train_digits_classifier --out=dit_jax/models/assets/digits_classifier.npz

One to two minutes on 2 CPU cores; the same --seed gives the same weights.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging

from dit_jax import cli, storage
from dit_jax.data.sources import heldout_split
from dit_jax.models.digits_cnn import (
  ASSET_PATH,
  FEATURE_DIM,
  IMAGE_SIZE,
  NUM_CLASSES,
  DigitsClassifier,
  DigitsCNN,
  preprocess,
  save_classifier,
)

# Canonical resize of the 8x8 digits for training and validation. Bilinear never overshoots the
# [-1, 1] range (bicubic does); the trainer also shows nearest and bicubic versions so that the
# dataset module's own choice of resize does not matter.
TRAIN_RESIZE_METHOD = "linear"


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


def _define_flags() -> None:
  """Defines the flags only when run as a program, so that tests can import this module."""
  flags.DEFINE_string("out", ASSET_PATH, "Where to write the npz.")
  flags.DEFINE_integer("seed", 0, "Training seed.")
  flags.DEFINE_integer("num_steps", 800, "Optimizer steps.")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  storage.check_writable(f.out)
  classifier = train_classifier(seed=f.seed, num_steps=f.num_steps)
  save_classifier(classifier, f.out)
  meta = classifier.metadata
  print(
    f"validation accuracy {meta['val_accuracy']:.4f} (16px), {meta['val_accuracy_32']:.4f} "
    f"(32px); train accuracy {meta['train_accuracy']:.4f}; trained in "
    f"{meta['train_time_s']:.1f} s; wrote {f.out} ({storage.getsize(f.out)} bytes)"
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
