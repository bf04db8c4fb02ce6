"""Random-access data sources, chosen by `config.data.name`.

Every source follows grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`), exposes
`num_classes`, and returns elements `{"image": np.float32 [H, W, C], "label": np.int32 []}`, or,
for text-conditioned data, `{"image", "context": np.float32 [L, Dc], "pooled": np.float32 [Dp]}`
(see `dit_jax.data.text`). Pixel images are scaled to [-1, 1]; latents are returned as stored,
times `config.data.latent_scale`.

Names:
  digits       the 1,797 8x8 handwritten digits that scikit-learn ships, resized to image_size;
               config.data.split "train" is all of them (scikit-learn has no split), "fit" and
               "held_out" the 80% / 20% on which the shipped digit classifier was trained and
               validated (`heldout_split`).
  synthetic    `config.data.synthetic_size` standard-normal images, deterministic per index,
               with random labels, or random text embeddings of the sizes config.model.context_len,
               context_dim and pooled_dim for a text-conditioned model (mmdit).
  shapes       the built-in captioned dataset of the text-to-image quickstart ("a red circle at
               the top left"), rendered on the fly; config.data.split is "train" or "held_out".
  tfds:<name>  a prepared TensorFlow Datasets dataset, read with `tfds.data_source`.
  folder       `config.data.path/<class>/<image>`: sorted sub-folder names are labels 0..K-1.
  latents      pre-encoded latents in the directory `config.data.path`:
                 latents.npy  float16 or float32 [N, H, W, C], the encoder's output;
                 labels.npy   integer [N], class ids in 0..K-1, and/or
                 the text embeddings written by `python -m dit_jax.tools.encode_text`
                 (context.npy, pooled.npy, text_encoders.json, null_text.npz; dit_jax.data.text).
               All are plain `np.save` files, memory-mapped, not loaded; in a bucket (and with
               encode_latents --format=array_record) they are ArrayRecord shards read a record at
               a time (dit_jax.data.records), the text ones too. With the latents.json of
               `python -m dit_jax.tools.encode_latents` (layout in dit_jax.data.latents) they are
               already scaled and config.data.latent_scale must equal its scaling_factor; the
               posterior std and the flipped images' latents it may write are drawn from by the
               training pipeline. Without latents.json they are multiplied by latent_scale.

Pixel sources other than digits resize and crop exactly as ADM (guided-diffusion's
`center_crop_arr`, also DiT's): `adm_center_crop`.
"""

import io
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from dit_jax import storage
from dit_jax.data import buckets, latents, records, text
from dit_jax.errors import ConfigError, check_numbers

SOURCE_NAMES = ("digits", "synthetic", "shapes", "tfds:<name>", "folder", "latents")
BUCKETED_SOURCES = ("synthetic", "shapes", "latents")  # Those training reads in buckets.
# Those encode_latents also reads in buckets, each image at the bucket nearest its aspect ratio
# (training cannot: it needs every element's bucket before reading any).
ENCODED_IN_BUCKETS = ("synthetic", "shapes", "folder", "tfds:<name>")

# What each number in config.data accepts (see errors.check_numbers).
NUMBERS = (
  ("data.image_size", "> 0", ""),
  ("data.channels", "> 0", ""),
  ("data.latent_scale", "> 0", " (the factor pre-encoded latents are multiplied by)"),
  ("data.num_workers", ">= 0", " (0 = threads in this process)"),
  ("data.prefetch", ">= 0", " (0 = off)"),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for a number in config.data that cannot work (the source and its files
  are checked when it is built)."""
  check_numbers(config, NUMBERS)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_DIGITS_SIZES = (8, 16, 32)
_DIGITS_SPLITS = ("train", "fit", "held_out")


class DataError(ConfigError):
  """A data config that does not match the data on disk, or data that cannot be read."""


class Source(Protocol):
  """What the pipeline needs from a source."""

  num_classes: int | None

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


_NPY_MAGIC = b"\x93NUMPY"
_DTYPE_KINDS = {
  "U": "strings",
  "S": "bytes",
  "V": "records",
  "b": "booleans",
  "c": "complex numbers",
  "M": "dates",
  "m": "time deltas",
}


def describe_array(array: np.ndarray) -> str:
  """`float32 [3, 4, 4, 1]`, or for non-numbers e.g. `strings (<U5) [3]`."""
  kind = _DTYPE_KINDS.get(array.dtype.kind)
  if kind:
    return f"{kind} ({array.dtype.str}) {list(array.shape)}"
  return f"{array.dtype} {list(array.shape)}"


def _not_npy(head: bytes) -> str:
  """What a file that begins with `head` (not the .npy magic) is, in words."""
  if not head:
    return "is empty"
  if head.startswith(b"PK\x03\x04"):
    return "is an .npz archive (np.savez), not a .npy array"
  if head.startswith(b"\x80"):
    return "is a Python pickle, not a .npy array"
  try:
    first_line = head.decode("utf-8").splitlines()[0]
  except UnicodeDecodeError:
    return f"is not a .npy file (it begins {head[:8]!r})"
  return f"is a text file (it begins {first_line[:24]!r}), not a .npy array"


def _npy_problem(path: str) -> str | None:
  """Why `path` is not a whole .npy array of numbers (its header and size say), or None."""
  with storage.open_read(path) as f:
    head = f.read(len(_NPY_MAGIC) + 26)
    if not head.startswith(_NPY_MAGIC):
      return _not_npy(head)
    f.seek(0)
    try:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0
      if version != (1, 0):
        read = np.lib.format.read_array_header_2_0
      shape, _, dtype = read(f)
    except (ValueError, OSError) as e:
      return f"has a damaged .npy header ({e})"
    if dtype.hasobject:
      return "holds Python objects (an array saved with allow_pickle=True), not numbers"
    want = f.tell() + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
  size = storage.getsize(path)
  if size < want:
    return f"is truncated ({size} of the {want} bytes of {dtype} {list(shape)})"
  return None


def open_array(path: str, expect: str) -> np.ndarray:
  """Memory-maps the .npy file `path` (a `gs://` one is read into memory: keep those small).

  Args:
    path: the file.
    expect: what it should hold and how to make it, for the error message.

  Raises:
    DataError: naming the file, what it holds and `expect`, if it is not a whole .npy array of
      plain values (numbers, or strings, which the caller may reject).
  """
  try:
    problem = _npy_problem(path)
    array = None if problem else storage.load_npy(path, mmap=True)
  except OSError as e:
    problem = f"cannot be read ({e})"
  except ValueError as e:
    problem = f"cannot be read as a .npy array ({e})"
  if problem:
    raise DataError(f"{path!r} {problem}; {expect}")
  return array


def open_text(directory: str) -> tuple[Any, Any]:
  """The text embeddings that dit_jax.tools.encode_text wrote into `directory`: (context
  [N, L, Dc], pooled [N, Dp]) as memory-mapped .npy arrays, or as columns of its ArrayRecord
  shards (read a row at a time); `TextSpec.load(directory)` gives their layout.

  Raises:
    DataError: if they are missing, unfinished or not arrays.
  """
  stored = text.stored_layout(directory)
  if stored.format != records.FORMAT:
    expect = "expected text embeddings; re-run dit_jax.tools.encode_text into this directory."
    context = open_array(storage.join(directory, text.CONTEXT_FILE), expect)
    return context, open_array(storage.join(directory, text.POOLED_FILE), expect)
  names = records.shard_names(text.SHARD_KIND, stored.count, stored.shard_size)
  present = set(storage.listdir(directory))
  missing = [n for n in names if n not in present]
  if missing:
    raise DataError(
      f"{directory!r} lacks {len(missing)} of the {len(names)} text shards that its "
      f"{text.SPEC_FILE} lists (first: {missing[0]}); re-run dit_jax.tools.encode_text with the "
      "same arguments to finish them."
    )
  rows = records.Records([storage.join(directory, n) for n in names])
  return records.Column(rows, "context"), records.Column(rows, "pooled")


def _element(image: np.ndarray, label: Any) -> dict[str, np.ndarray]:
  return {"image": image, "label": np.int32(label)}


def adm_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
  """ADM's center crop of `image` to `size` x `size` (guided-diffusion's `center_crop_arr`), or
  its extension to a bucket `size` = (height, width).

  Halves the whole image with a box filter while both sides are at least twice the target's,
  scales it with bicubic so that it just covers the target (for a square: the shorter side
  becomes `size`, the other rounded), then takes the central part (top-left corner at
  ((width - w) // 2, (height - h) // 2)). For a square target this is ADM's crop exactly.
  """
  h, w = (size, size) if isinstance(size, int) else size
  # One large bicubic step aliases; repeated box halving averages every source pixel first.
  while image.width >= 2 * w and image.height >= 2 * h:
    image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
  scale = max(w / image.width, h / image.height)
  image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
  left, top = (image.width - w) // 2, (image.height - h) // 2
  return image.crop((left, top, left + w, top + h))


def _pil_to_array(image: Image.Image, size: int, channels: int, sizes: tuple = ()) -> np.ndarray:
  """Converts, crops and resizes `image`; returns float32 [size, size, channels] in [-1, 1], or
  with bucket `sizes` [h, w, channels] at the bucket nearest the image's aspect ratio."""
  target = sizes[buckets.nearest(image.height, image.width, sizes)] if sizes else (size, size)
  image = adm_center_crop(image.convert("L" if channels == 1 else "RGB"), target)
  array = np.asarray(image, np.float32) / 127.5 - 1.0
  return array.reshape(*target, channels)


def _check_pixel_channels(config: ml_collections.ConfigDict) -> None:
  if config.data.channels not in (1, 3):
    raise DataError(
      f"config.data.channels={config.data.channels} is not supported for "
      f"config.data.name={config.data.name!r}; set it to 1 (grayscale) or 3 (RGB)."
    )


def heldout_split(
  num_examples: int, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random split of example indices into (train, validation).

  Args:
    num_examples: size of the dataset.
    val_fraction: fraction of examples held out.
    seed: seed of the permutation; independent of the training seed, so the held-out set
      stays the same when the classifier is retrained with another seed.

  Returns:
    (train_indices, val_indices), each sorted.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  perm = np.random.default_rng(seed).permutation(num_examples)
  num_val = int(round(num_examples * val_fraction))
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


class DigitsSource:
  """scikit-learn's 8x8 digits, resized once at construction (bicubic on the float image)."""

  num_classes = 10

  def __init__(self, image_size: int, split: str = "train"):
    from sklearn.datasets import load_digits  # Imported here: sklearn adds a second to startup.

    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # [N, 8, 8], 0..16 -> -1..1.
    if image_size != 8:
      images = np.stack(
        [
          np.asarray(Image.fromarray(x).resize((image_size, image_size), Image.BICUBIC))
          for x in images
        ]
      )
    # Bicubic overshoots near strokes; clipping keeps the documented range.
    self._images = np.clip(images, -1.0, 1.0)[..., None]  # [N, S, S, 1]
    self._labels = digits.target.astype(np.int32)
    if split != "train":
      fit, held_out = heldout_split(len(self._labels))
      index = fit if split == "fit" else held_out
      self._images, self._labels = self._images[index], self._labels[index]

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return _element(self._images[index].copy(), self._labels[index])


class SyntheticSource:
  """Standard-normal images with uniform labels, or with standard-normal text embeddings if
  `text_spec` is given; element i depends only on (seed, i)."""

  def __init__(
    self,
    size: int,
    shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
    text_spec: text.TextSpec | None = None,
    buckets: tuple = (),
  ):
    self._size = size
    self._shape = shape
    self.buckets = tuple(tuple(b) for b in buckets)
    self._seed = seed
    self.num_classes = None if text_spec else num_classes
    self.text_spec = text_spec

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._size:
      raise IndexError(f"Index {index} out of range for {self._size} synthetic examples.")
    rng = np.random.default_rng([self._seed, index])
    shape = self._shape
    if self.buckets:
      shape = (*self.buckets[index % len(self.buckets)], shape[-1])
    image = rng.standard_normal(shape, dtype=np.float32)
    if self.text_spec is None:
      return _element(image, rng.integers(max(self.num_classes, 1)))
    s = self.text_spec
    return {
      "image": image,
      "context": rng.standard_normal((s.context_len, s.context_dim), dtype=np.float32),
      "pooled": rng.standard_normal((s.pooled_dim,), dtype=np.float32),
    }

  def bucket_of(self) -> np.ndarray:
    """The bucket of every element [N] (with config.data.buckets): element i is in i % K."""
    return np.arange(self._size) % len(self.buckets)


class TfdsSource:
  """A prepared TFDS dataset; images are cropped, resized and converted per element."""

  def __init__(self, config: ml_collections.ConfigDict, buckets: tuple = ()):
    import tensorflow_datasets as tfds  # Imported here: only this source needs it.

    data = config.data
    name = data.name.removeprefix("tfds:")
    try:
      # download=False: a training job must not start fetching a dataset on its own.
      self._source = tfds.data_source(name, split=data.split, download=False)
    except (KeyError, ValueError, FileNotFoundError, AssertionError) as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise DataError(
        f"config.data.name={data.name!r} (split config.data.split={data.split!r}) could not be "
        f"opened: {reason} Prepare it with `tfds build {name}` and set TFDS_DATA_DIR to the data "
        "directory it was built in."
      ) from e
    features = self._source.dataset_info.features
    for field in ("image_key", "label_key"):
      if data[field] not in features:
        raise DataError(
          f"config.data.{field}={data[field]!r} is not a feature of {data.name!r}; "
          f"its features are {sorted(features.keys())}."
        )
    self.num_classes = getattr(features[data.label_key], "num_classes", None)
    self._image_key = data.image_key
    self._label_key = data.label_key
    self._size = data.image_size
    self._channels = data.channels
    self._buckets = tuple(buckets)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._source[index]
    pixels = np.asarray(example[self._image_key])
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[..., 0]  # PIL reads [H, W] as grayscale but rejects [H, W, 1].
    image = _pil_to_array(Image.fromarray(pixels), self._size, self._channels, self._buckets)
    return _element(image, example[self._label_key])


class FolderSource:
  """`root/<class>/<image>` files, decoded lazily; labels follow the sorted class names."""

  def __init__(self, root: str, image_size: int, channels: int, buckets: tuple = ()):
    """Lists `root` (a local directory or a gs:// prefix) once; images are read when asked for
    (with bucket sizes: each at the one nearest its aspect ratio)."""
    remote = storage.is_remote(root)
    if not remote and not storage.isdir(root):
      raise DataError(
        f"config.data.path={root!r} does not exist or is not a directory; set it to an image "
        "folder with one sub-folder per class."
      )
    base = storage.resolve(root)
    by_class: dict[str, list[str]] = {}
    if not remote:  # A local class folder without images is an error, not a missing label.
      for name in storage.listdir(base):
        if not name.startswith(".") and storage.isdir(storage.join(base, name)):
          by_class[name] = []
    for file in storage.find(base):
      name, sep, rest = file[len(base) + 1 :].partition("/")
      if sep and not name.startswith(".") and rest.lower().endswith(IMAGE_EXTENSIONS):
        by_class.setdefault(name, []).append(file)
    self.classes = sorted(by_class)
    if not self.classes:
      raise DataError(
        f"config.data.path={root!r} has no class sub-folders with images; expected "
        f"{root}/<class>/<image> with extensions {IMAGE_EXTENSIONS}."
      )
    for name in self.classes:
      if not by_class[name]:
        raise DataError(
          f"Class folder {storage.join(base, name)!r} under config.data.path={root!r} has no "
          f"images with extensions {IMAGE_EXTENSIONS}; add images or remove the folder."
        )
    self._files = [f for name in self.classes for f in sorted(by_class[name])]
    labels = [label for label, name in enumerate(self.classes) for _ in by_class[name]]
    self._labels = np.asarray(labels, np.int32)
    self._size, self._channels, self.num_classes = image_size, channels, len(self.classes)
    self._buckets = tuple(buckets)

  def __len__(self) -> int:
    return len(self._files)

  def caption_files(self) -> list[str]:
    """`<name>.txt` beside each image `<name>.<ext>`, in the order of the images."""
    return [f.rsplit(".", 1)[0] + ".txt" for f in self._files]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self._files[index]
    try:
      with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
        image.load()
        image = image.convert("L" if self._channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"Cannot read image {path!r} ({e}); remove or fix this file.") from e
    image = _pil_to_array(image, self._size, self._channels, self._buckets)
    return _element(image, self._labels[index])


class LatentsSource:
  """Pre-encoded latents with labels and/or text embeddings, memory-mapped.

  Elements hold the stored latent (the posterior mean) as "image". `training_view` also reads the
  posterior std and the flipped image's latent, for the pipeline to draw from.

  Attributes:
    metadata: the `LatentsMetadata` of encode_latents, or None for hand-written latents.
    has_std: latents_std.npy is present.
    has_flip: latents_flip.npy is present.
  """

  def __init__(
    self,
    path: str,
    image_size: int,
    channels: int,
    scale: float,
    text_spec: text.TextSpec | None = None,
    vae_path: str = "",
    sizes: tuple = (),
  ):
    self._path = path
    self._sharded = False
    self._rows = None  # Element i is stored row i, or row _rows[i] (a view of one bucket).
    meta = latents.LatentsMetadata.load(path) if storage.isdir(path) else None
    if sizes and not (meta is not None and meta.buckets):
      raise DataError(
        f"config.data.buckets={buckets.format_sizes(sizes)!r}, but config.data.path={path!r} "
        "holds latents of one size; encode the images in those buckets with `python -m "
        "dit_jax.tools.encode_latents` and this config into a new --out, or set "
        "config.data.buckets=''."
      )
    if meta is not None and meta.format == records.FORMAT:
      self._init_records(meta, image_size, channels, scale, text_spec, vae_path, tuple(sizes))
      return
    if storage.is_remote(path):
      raise DataError(
        f"config.data.path={path!r} holds no array_record latents (no {latents.METADATA_FILE} "
        "saying so): latents in a bucket are ArrayRecord shards, which `python -m "
        "dit_jax.tools.encode_latents --out=gs://...` writes."
      )
    self._latents_path = storage.join(path, latents.LATENTS_FILE)
    self.labels_path = labels_path = storage.join(path, latents.LABELS_FILE)
    self.text_spec = text_spec
    want_text = text_spec is not None
    cond_files = [] if want_text else [labels_path]  # (Text is checked as it is opened.)
    missing = [p for p in (self._latents_path, *cond_files) if not storage.isfile(p)]
    if missing:
      raise DataError(
        f"config.data.path={path!r} does not hold pre-encoded latents: missing {missing}. "
        "Expected latents.npy [N, H, W, C] and labels.npy [N] written with np.save or "
        "dit_jax.tools.encode_latents"
        + (", and text embeddings from dit_jax.tools.encode_text." if want_text else ".")
      )
    self.metadata = meta
    if self.metadata is not None:
      self._check_metadata(scale, vae_path)
    self.has_std = storage.isfile(storage.join(path, latents.STD_FILE))
    self.has_flip = storage.isfile(storage.join(path, latents.FLIP_FILE))
    if self.has_std and self.has_flip and not storage.isfile(self._file("latent_flip_std")):
      raise DataError(
        f"config.data.path={path!r} has {latents.STD_FILE} and {latents.FLIP_FILE} but no "
        f"{latents.FLIP_STD_FILE}; re-run dit_jax.tools.encode_latents with --flip --std."
      )
    self._open()
    shape, dtype = self._latents.shape, self._latents.dtype
    if len(shape) != 4 or dtype not in (np.float16, np.float32) or not shape[0]:
      raise DataError(
        f"{self._latents_path!r} holds {describe_array(self._latents)}; {_LATENTS_EXPECT}"
      )
    for key, array in self._extra.items():
      if array.shape != shape or array.dtype not in (np.float16, np.float32):
        raise DataError(
          f"{self._file(key)!r} holds {describe_array(array)}; expected float16 or float32 "
          f"{list(shape)} like {self._latents_path!r}: {_REENCODE}"
        )
    self._check_shape(image_size, channels)
    # encode_latents stores scaled latents; hand-written ones are scaled on read.
    self._scale = np.float32(1.0 if self.metadata is not None else scale)
    if want_text:
      self._check_text()
      return
    expect = (
      f"expected integer class ids [{shape[0]}] (one per row of {latents.LATENTS_FILE}) in "
      "0..K-1 for config.model.num_classes=K: write them with np.save(path, "
      "labels.astype(np.int32)), or encode the data with `python -m dit_jax.tools.encode_latents`."
    )
    labels = np.asarray(open_array(labels_path, expect))
    if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"{labels_path!r} holds {describe_array(labels)}; {expect}")
    if labels.min() < 0:
      row = int(np.argmin(labels))
      raise DataError(
        f"{labels_path!r} holds negative class ids ({labels[row]} in row {row}); {expect}"
      )
    self.num_classes = int(labels.max()) + 1
    self._labels = labels.astype(np.int32)

  def _init_records(self, meta, image_size, channels, scale, text_spec, vae_path, sizes) -> None:
    """The array_record layout (dit_jax.data.records): shards read on demand, labels (and
    buckets) in memory."""
    path, self._sharded, self.metadata = self._path, True, meta
    self.text_spec, self._scale = text_spec, np.float32(1.0)
    self._check_metadata(scale, vae_path)
    self.has_std, self.has_flip = meta.std, meta.flip
    self._latents_path = self.labels_path = path
    self._open()
    if meta.buckets:
      self._init_buckets(image_size, channels, sizes)
    else:
      self._check_shape(image_size, channels)
    if text_spec is not None:
      self._check_text()
      return
    labels = self._read_shards("labels")
    self.num_classes = int(labels.max()) + 1
    self._labels = labels.astype(np.int32)

  def _read_shards(self, kind: str) -> np.ndarray:
    """The per-row .npy shards of `kind` ("labels", "buckets") joined: [count]."""
    meta = self.metadata
    names = records.shard_names(kind, meta.count, meta.shard_size)
    rows = np.concatenate([storage.load_npy(storage.join(self._path, n)) for n in names])
    if rows.shape != (meta.count,):
      raise DataError(
        f"The {kind} shards in config.data.path={self._path!r} hold {rows.shape[0]} rows, not "
        f"{meta.count} as {latents.METADATA_FILE} says: {_REENCODE}"
      )
    return rows

  def _init_buckets(self, image_size: int, channels: int, sizes: tuple) -> None:
    """Latents encoded in buckets: training (`sizes` given) reads them all in the buckets they
    were encoded in; other readers (validation, reference statistics) see the square bucket of
    config.data.image_size alone."""
    stored = buckets.parse(self.metadata.buckets)
    path = self._path
    if channels != self.metadata.latent_channels:
      raise DataError(
        f"config.data.path={path!r} holds {self.metadata.latent_channels}-channel latents, but "
        f"config.data.channels={channels}; set config.data.channels="
        f"{self.metadata.latent_channels}."
      )
    bucket_ids = self._read_shards("buckets")
    if sizes:
      if sizes != stored:
        raise DataError(
          f"config.data.path={path!r} holds latents encoded in the buckets "
          f"{self.metadata.buckets!r}, but config.data.buckets={buckets.format_sizes(sizes)!r}; "
          f"set config.data.buckets={self.metadata.buckets!r}."
        )
      self._bucket_of = bucket_ids
      return
    square = (image_size, image_size)
    if square not in stored:
      raise DataError(
        f"config.data.path={path!r} holds latents in the buckets {self.metadata.buckets!r}, "
        f"none of them {image_size}x{image_size} (config.data.image_size), which is what is "
        "read outside training (validation, reference statistics); set config.data.image_size "
        "to a square bucket's side, config.eval.val_path to square latents, and "
        "config.eval.reference to an ADM reference batch."
      )
    self._rows = np.flatnonzero(bucket_ids == stored.index(square))

  def bucket_of(self) -> np.ndarray:
    """The bucket of every element [N] (latents encoded in config.data.buckets)."""
    return self._bucket_of

  def _check_text(self) -> None:
    """The text embeddings have one row per latent and the sizes of text_encoders.json."""
    s, n = self.text_spec, len(self._latents)  # (All rows, also in a view of one bucket.)
    for what, array, want in (
      ("context", self._context, (n, s.context_len, s.context_dim)),
      ("pooled", self._pooled, (n, s.pooled_dim)),
    ):
      if tuple(array.shape) != want:
        raise DataError(
          f"The text {what} in config.data.path={self._path!r} is {list(array.shape)}; expected "
          f"{list(want)} to match the {n} latents and {text.SPEC_FILE}. Re-run "
          "dit_jax.tools.encode_text with the captions of these latents."
        )
    self._labels, self.num_classes = None, None

  def _check_shape(self, image_size: int, channels: int) -> None:
    got, want = list(self._latents.shape[1:]), [image_size, image_size, channels]
    if got != want:
      raise DataError(
        f"config.data.path={self._path!r} holds latents of shape [H, W, C]={got}, but "
        f"config.data.image_size={image_size} and config.data.channels={channels} expect "
        f"{want}; set those two fields to match the files."
      )

  def _check_metadata(self, scale: float, vae_path: str) -> None:
    meta, path = self.metadata, self._path
    sharded = meta.format == records.FORMAT
    if sharded:
      present = set(storage.listdir(path))
      names = records.shard_names("latents", meta.count, meta.shard_size)
      rows = min(sum(n in present for n in names) * meta.shard_size, meta.count)
    else:
      rows = latents.read_progress(path)
    if rows is None or rows < meta.count:
      raise DataError(
        f"config.data.path={path!r} is incomplete ({rows or 0} of {meta.count} examples "
        "encoded); re-run dit_jax.tools.encode_latents with the same arguments to finish it."
      )
    files = [] if sharded else meta.latent_files()  # (Shards hold every array.)
    missing = [f for f in files if not storage.isfile(storage.join(path, f))]
    if missing:
      raise DataError(
        f"config.data.path={path!r} lacks {missing}, which its {latents.METADATA_FILE} lists; "
        "re-run dit_jax.tools.encode_latents into a new directory."
      )
    if not latents.same_factor(scale, meta.scaling_factor):
      raise DataError(
        f"The latents in config.data.path={path!r} are already scaled by the VAE's "
        f"scaling_factor={meta.scaling_factor} (shift_factor={meta.shift_factor}), but "
        f"config.data.latent_scale={scale}; set config.data.latent_scale={meta.scaling_factor}."
      )
    # The VAE that decodes samples undoes its own scale and shift: they must be the encoder's.
    factors = latents.vae_factors(vae_path) if vae_path else None
    if factors is not None and not (
      latents.same_factor(factors[0], meta.scaling_factor)
      and latents.same_factor(factors[1], meta.shift_factor)
    ):
      raise DataError(
        f"The latents in config.data.path={path!r} were made with scaling_factor="
        f"{meta.scaling_factor} and shift_factor={meta.shift_factor}, but the VAE at "
        f"config.vae.path={vae_path!r} decodes with {factors[0]} and {factors[1]}; set "
        f"config.vae.path to the VAE that encoded them ({meta.vae})."
      )

  def _file(self, key: str) -> str:
    return storage.join(self._path, _LATENT_VARIANT_FILES[key])

  def _open(self) -> None:
    if self._sharded:
      meta = self.metadata
      names = records.shard_names("latents", meta.count, meta.shard_size)
      rec = records.Records([storage.join(self._path, n) for n in names])
      self._latents = records.Column(rec, "latent")
      keys = ["latent_std"] * meta.std + ["latent_flip"] * meta.flip
      keys += ["latent_flip_std"] * (meta.std and meta.flip)
      self._extra = {k: records.Column(rec, k) for k in keys}
    else:
      self._latents = open_array(self._latents_path, _LATENTS_EXPECT)
      present = {"latent_std": self.has_std, "latent_flip": self.has_flip}
      present["latent_flip_std"] = self.has_std and self.has_flip
      expect = f"expected float16 or float32 latents like {latents.LATENTS_FILE}: {_REENCODE}"
      self._extra = {k: open_array(self._file(k), expect) for k, on in present.items() if on}
    if self.text_spec is not None:
      self._context, self._pooled = open_text(self._path)

  def __getstate__(self) -> dict[str, Any]:
    # Pickling a memmap copies the whole array into every grain worker; reopen it there instead.
    return {**self.__dict__, "_latents": None, "_extra": None, "_context": None, "_pooled": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._latents) if self._rows is None else len(self._rows)

  def read(self, index: int, variants: bool = False) -> dict[str, np.ndarray]:
    """Element `index`; with `variants`, also its "latent_std", "latent_flip" and
    "latent_flip_std" (those present), float32 and scaled like the latent."""
    if self._rows is not None:
      index = int(self._rows[index])
    element = {"image": np.asarray(self._latents[index], np.float32) * self._scale}
    if variants:
      for key, array in self._extra.items():
        element[key] = np.asarray(array[index], np.float32) * self._scale
    if self.text_spec is None:
      element["label"] = np.int32(self._labels[index])
    else:
      element["context"] = np.asarray(self._context[index], np.float32)
      element["pooled"] = np.asarray(self._pooled[index], np.float32)
    return element

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.read(index)

  def training_view(self) -> "Source":
    """This source with every element's variants (see `read`), for the training pipeline."""
    return _LatentVariants(self)


_LATENTS_EXPECT = (
  "expected float16 or float32 [N, H, W, C] with N > 0: encode the images with `python -m "
  "dit_jax.tools.encode_latents`, or write such an array with np.save."
)
_REENCODE = "re-run dit_jax.tools.encode_latents into a new directory."
_LATENT_VARIANT_FILES = {
  "latent_std": latents.STD_FILE,
  "latent_flip": latents.FLIP_FILE,
  "latent_flip_std": latents.FLIP_STD_FILE,
}


class _LatentVariants:
  """A `LatentsSource` whose elements carry their posterior std and flipped latents."""

  def __init__(self, source: LatentsSource):
    self._source = source
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._source.read(index, variants=True)


def is_pixel_data(config: ml_collections.ConfigDict) -> bool:
  """Whether the model's samples are images (pixels in [-1, 1]) rather than latents."""
  return config.data.name != "latents" and config.data.channels in (1, 3)


def wants_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is conditioned on text (MMDiT) rather than class labels (DiT)."""
  return config.model.name == "mmdit"


def text_spec(config: ml_collections.ConfigDict) -> text.TextSpec | None:
  """The text layout of the data a text-conditioned model trains on (None for DiT).

  The sizes in config.model (context_len, context_dim, pooled_dim; 0 = take the data's) must
  match the data's.

  Raises:
    DataError: if the data has no text or its sizes differ from the config's.
  """
  if not wants_text(config):
    return None
  m, name = config.model, config.data.name
  if name == "synthetic":
    sizes = {f: int(m[f]) for f in ("context_len", "context_dim", "pooled_dim")}
    if min(sizes.values()) <= 0:
      raise DataError(
        f"Synthetic text for config.model.name='mmdit' needs config.model.context_len, "
        f"context_dim and pooled_dim > 0 (got {sizes})."
      )
    return text.single_encoder_spec(**sizes)
  if name == "shapes":
    from dit_jax.data import shapes

    spec = shapes.text_spec()
  elif name == "latents":
    spec = text.TextSpec.load(config.data.path)
  else:
    raise DataError(
      f"config.data.name={name!r} has no captions, but config.model.name='mmdit' is conditioned "
      "on text; use 'shapes', 'synthetic', or 'latents' with text embeddings."
    )
  for field, value in (
    ("context_len", spec.context_len),
    ("context_dim", spec.context_dim),
    ("pooled_dim", spec.pooled_dim),
  ):
    if m[field] and m[field] != value:
      raise DataError(
        f"config.model.{field}={m[field]} but the text of config.data.name={name!r} has "
        f"{value}; set --config.model.{field}={value} (or 0 to take the data's)."
      )
  return spec


def build_source(
  config: ml_collections.ConfigDict,
  num_classes: int | None = None,
  bucketed: bool = False,
  encoding: bool = False,
) -> Source:
  """Builds the source named by `config.data.name`.

  Args:
    config: the full config; reads `config.data` and, for synthetic data, `config.train.seed`.
    num_classes: the model's number of classes. Synthetic labels are drawn from [0, num_classes)
      (default `config.model.num_classes`); if positive, other sources must not hold more classes.
    bucketed: read the elements in the sizes of config.data.buckets (training batches); else at
      config.data.image_size (evaluation's real images, the validation split).
    encoding: with `bucketed`, the reader is encode_latents, which also reads folder and TFDS
      images in buckets (`ENCODED_IN_BUCKETS`; each at the bucket nearest its aspect ratio).

  Returns:
    A random-access source with a `num_classes` attribute.

  Raises:
    DataError: if the config does not describe readable data.
  """
  data = config.data
  name = data.name
  sizes = buckets.parse(data.buckets) if bucketed else ()
  if data.image_size <= 0 or data.channels <= 0:
    raise DataError(
      f"config.data.image_size={data.image_size} and config.data.channels={data.channels} must "
      "both be positive."
    )
  # None for class-conditional models; raises if the data has no text or other text sizes.
  spec = text_spec(config)
  if name == "digits":
    if data.image_size not in _DIGITS_SIZES:
      raise DataError(
        f"config.data.image_size={data.image_size} is not supported for digits; use one of "
        f"{_DIGITS_SIZES}."
      )
    if data.channels != 1:
      raise DataError(
        f"config.data.channels={data.channels}, but digits are grayscale; set it to 1."
      )
    if data.split not in _DIGITS_SPLITS:
      raise DataError(
        f"config.data.split={data.split!r} is not a split of digits; use one of "
        f"{_DIGITS_SPLITS} (train: all 1,797; fit / held_out: 80% / 20% of them)."
      )
    source = DigitsSource(data.image_size, data.split)
  elif name == "synthetic":
    if data.synthetic_size <= 0:
      raise DataError(f"config.data.synthetic_size={data.synthetic_size} must be positive.")
    classes = config.model.num_classes if num_classes is None else num_classes
    shape = (data.image_size, data.image_size, data.channels)
    source = SyntheticSource(data.synthetic_size, shape, classes, config.train.seed, spec, sizes)
  elif name == "shapes":
    from dit_jax.data import shapes

    if data.channels != 3:
      raise DataError(f"config.data.channels={data.channels}, but shapes are RGB; set it to 3.")
    if not wants_text(config):
      raise DataError(
        "config.data.name='shapes' is captioned, without class labels; train it with "
        "config.model.name='mmdit'."
      )
    source = shapes.ShapesSource(
      data.split,
      data.image_size,
      size=data.synthetic_size,
      seed=config.train.seed,
      buckets=sizes,
    )
  elif name.startswith("tfds:") and len(name) > len("tfds:"):
    _check_pixel_channels(config)
    source = TfdsSource(config, sizes)
  elif name == "folder":
    _check_pixel_channels(config)
    source = FolderSource(data.path, data.image_size, data.channels, sizes)
  elif name == "latents":
    source = LatentsSource(
      data.path, data.image_size, data.channels, data.latent_scale, spec, config.vae.path, sizes
    )
  else:
    raise DataError(f"config.data.name={name!r} is unknown; use one of {SOURCE_NAMES}.")
  if sizes and not encoding and not hasattr(source, "bucket_of"):
    raise DataError(
      f"config.data.buckets={data.buckets!r}, but config.data.name={name!r} cannot be trained "
      f"in buckets; buckets work with {list(BUCKETED_SOURCES)}: encode the images in buckets "
      "with `python -m dit_jax.tools.encode_latents` (it reads the folder or TFDS images, each "
      "at the bucket nearest its aspect ratio) and train on those latents, or set "
      "config.data.buckets=''."
    )
  if num_classes and source.num_classes is not None and source.num_classes > num_classes:
    where = f" in {source.labels_path!r}" if isinstance(source, LatentsSource) else ""
    raise DataError(
      f"config.data.name={name!r} has {source.num_classes} classes (class ids up to "
      f"{source.num_classes - 1}{where}), but the model has {num_classes} "
      f"(config.model.num_classes); set config.model.num_classes={source.num_classes}, or "
      f"relabel the data with ids 0..{num_classes - 1}."
    )
  if num_classes and source.num_classes is not None and source.num_classes < num_classes:
    logging.warning(
      "config.data.name=%r has %d classes but config.model.num_classes=%d: classes %d..%d are "
      "never trained, yet balanced samples draw them; set config.model.num_classes=%d unless "
      "the data lacks them on purpose.",
      name,
      source.num_classes,
      num_classes,
      source.num_classes,
      num_classes - 1,
      source.num_classes,
    )
  logging.info("Data %r: %d examples, %s classes.", name, len(source), source.num_classes)
  return source
