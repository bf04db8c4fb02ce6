"""The built-in captioned dataset "shapes": one coloured shape on black, for text-to-image.

Captions follow one template, "a {colour} {shape} at the {position}", e.g. "a red circle at the
top left": 4 colours x 3 shapes x 4 positions = 48 combinations. Eight of them are held out of
training to measure compositional generalisation. They are chosen so that every (colour, shape),
(colour, position) and (shape, position) pair is held out at most once, so each pair still occurs
in training (with 3, 2 and 3 partners respectively) and only the triple is new.

Images are rendered on the fly (no downloads): the filled shape, about 40% of the image side,
sits in its quadrant with a small random jitter of position and size. Captions are encoded by a
fixed bag-of-word-vectors encoder (`encode_captions`): each vocabulary word has a constant unit
vector, so the encoding needs no weights and no training.
"""

import itertools
from collections.abc import Sequence

import numpy as np

from dit_jax.data.text import EncoderSlot, TextSpec
from dit_jax.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (230, 30, 30),
  "green": (30, 200, 30),
  "blue": (40, 70, 240),
  "yellow": (240, 220, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATE = "a {colour} {shape} at the {position}"
IMAGE_SIZES = (16, 32)
SPLITS = ("train", "held_out")

# (colour, shape, position): colour c is held out at positions c and 3 - c (opposite corners),
# so each colour and each position is held out exactly twice; the shapes were picked so that no
# pair of attributes is held out twice (checked in tests/test_shapes.py).
HELD_OUT = (
  ("red", "circle", "top left"),
  ("red", "square", "bottom right"),
  ("green", "square", "top right"),
  ("green", "triangle", "bottom left"),
  ("blue", "circle", "bottom left"),
  ("blue", "triangle", "top right"),
  ("yellow", "circle", "bottom right"),
  ("yellow", "square", "top left"),
)

# The text encoder. The word order fixes which vector each word gets: append, never reorder.
WORDS = ("a", *COLOURS, *SHAPES, "at", "the", "top", "bottom", "left", "right")
CONTEXT_LEN = 8
EMBED_DIM = 32
_WORD_SEED = 20240601

# Rendering: the shape's bounding box has side _SIZE_FRACTION * S times U[_MIN_SCALE, 1]; its
# centre is the quadrant's centre moved S * _INSET towards the image centre, plus a jitter of up
# to S * _JITTER per axis. With these values the shape never reaches the image border and crosses
# into a neighbouring quadrant by less than one pixel at 16x16 and 32x32.
_SIZE_FRACTION = 0.42
_MIN_SCALE = 0.9
_INSET = 1 / 64
_JITTER = 1 / 20
_SUPERSAMPLE = 8


def _all_combos() -> list[tuple[str, str, str]]:
  return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def caption_of(colour: str, shape: str, position: str) -> str:
  """The caption of one combination, e.g. "a red circle at the top left"."""
  return TEMPLATE.format(colour=colour, shape=shape, position=position)


def all_captions() -> list[str]:
  """The 48 captions, colour-major."""
  return [caption_of(*combo) for combo in _all_combos()]


def held_out_captions() -> list[str]:
  """The 8 captions never seen in training."""
  return [caption_of(*combo) for combo in HELD_OUT]


def train_captions() -> list[str]:
  """The 40 training captions, colour-major."""
  return [caption_of(*combo) for combo in _all_combos() if combo not in HELD_OUT]


def parse_caption(caption: str) -> tuple[str, str, str]:
  """Splits a caption of the template into (colour, shape, position).

  Raises:
    ConfigError: if `caption` does not follow "a {colour} {shape} at the {position}".
  """
  words = caption.split()
  if (
    len(words) == 7
    and words[0] == "a"
    and words[1] in COLOURS
    and words[2] in SHAPES
    and words[3:5] == ["at", "the"]
    and " ".join(words[5:]) in POSITIONS
  ):
    return words[1], words[2], " ".join(words[5:])
  raise ConfigError(
    f"Caption {caption!r} is not of the form {TEMPLATE!r} with colour in {list(COLOURS)}, "
    f"shape in {list(SHAPES)} and position in {list(POSITIONS)}; rewrite it in that form."
  )


# The sides a bucket of shapes images (config.data.buckets) may have.
BUCKET_SIDES = (12, 64)


def _hw(image_size) -> tuple[int, int]:
  """S or (H, W) -> (H, W)."""
  if isinstance(image_size, int | np.integer):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def _check_image_size(image_size) -> None:
  if isinstance(image_size, int | np.integer):
    if image_size not in IMAGE_SIZES:
      raise ConfigError(
        f"config.data.image_size={image_size} is not supported for the shapes dataset; use one "
        f"of {IMAGE_SIZES}."
      )
    return
  h, w = _hw(image_size)
  lo, hi = BUCKET_SIDES
  if not (lo <= h <= hi and lo <= w <= hi):
    raise ConfigError(
      f"The bucket {h}x{w} is not supported for the shapes dataset; use sides in [{lo}, {hi}]."
    )


def coverage(shape: str, cx: float, cy: float, d: float, image_size) -> np.ndarray:
  """Fraction of each pixel covered by a shape, from _SUPERSAMPLE^2 samples per pixel.

  Args:
    shape: one of SHAPES.
    cx: the horizontal centre of the shape's bounding box, in pixels from the left edge.
    cy: the vertical centre, in pixels from the top edge.
    d: the side of the bounding box, in pixels.
    image_size: S, or (H, W).

  Returns:
    float32 [H, W] in [0, 1].
  """
  k = _SUPERSAMPLE
  h, w = _hw(image_size)
  x = (np.arange(w * k) + 0.5)[None, :] / k - cx  # Sample positions in pixel units, [1, W*k].
  y = (np.arange(h * k) + 0.5)[:, None] / k - cy  # [H*k, 1]; they broadcast to [H*k, W*k].
  r = d / 2
  if shape == "circle":
    inside = x**2 + y**2 <= r**2
  elif shape == "square":
    inside = (np.abs(x) <= r) & (np.abs(y) <= r)
  else:  # An upright triangle: apex at the top centre, base along the bottom of the box.
    inside = (y <= r) & (np.abs(x) <= (y + r) / 2)
  inside = inside.astype(np.float32).reshape(h, k, w, k)
  return inside.mean(axis=(1, 3))  # [H, W]


def render(
  colour: str,
  shape: str,
  position: str,
  image_size,
  rng: np.random.Generator | None = None,
) -> np.ndarray:
  """Draws one filled, antialiased shape on black.

  Args:
    colour: a key of COLOURS.
    shape: one of SHAPES.
    position: one of POSITIONS; the quadrant the shape sits in.
    image_size: S, 16 or 32; or a bucket (H, W), each side in BUCKET_SIDES (the shape's size
      follows the shorter side, its position each side).
    rng: draws the jitter of position (up to 1/20 of each side) and size; None draws none.

  Returns:
    uint8 [H, W, 3].
  """
  _check_image_size(image_size)
  if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
    raise ConfigError(
      f"Cannot render ({colour!r}, {shape!r}, {position!r}); colour must be one of "
      f"{list(COLOURS)}, shape one of {list(SHAPES)}, position one of {list(POSITIONS)}."
    )
  h, w = map(float, _hw(image_size))
  vertical, horizontal = position.split()
  cx = w * (0.25 + _INSET if horizontal == "left" else 0.75 - _INSET)
  cy = h * (0.25 + _INSET if vertical == "top" else 0.75 - _INSET)
  d = _SIZE_FRACTION * min(h, w)
  if rng is not None:
    reach = np.array([w, h]) * _JITTER
    jx, jy = rng.uniform(-reach, reach, size=2)
    cx, cy, d = cx + jx, cy + jy, d * rng.uniform(_MIN_SCALE, 1.0)
  cover = coverage(shape, cx, cy, d, image_size)
  image = cover[..., None] * np.asarray(COLOURS[colour], np.float32)  # [H, W, 3]
  return np.round(image).astype(np.uint8)


def _word_vectors() -> dict[str, np.ndarray]:
  vectors = np.random.default_rng(_WORD_SEED).standard_normal((len(WORDS), EMBED_DIM))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return dict(zip(WORDS, vectors.astype(np.float32), strict=True))


_WORD_VECTORS = _word_vectors()


def encode_captions(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Encodes captions with the fixed word vectors.

  Args:
    captions: N captions of at most CONTEXT_LEN words from WORDS; "" is the empty caption.

  Returns:
    context float32 [N, CONTEXT_LEN, EMBED_DIM], the word vectors in order, zero-padded; and
    pooled float32 [N, EMBED_DIM], their mean (zeros for the empty caption).

  Raises:
    ConfigError: for an unknown word or a caption longer than CONTEXT_LEN words.
  """
  context = np.zeros((len(captions), CONTEXT_LEN, EMBED_DIM), np.float32)
  pooled = np.zeros((len(captions), EMBED_DIM), np.float32)
  for n, caption in enumerate(captions):
    words = caption.split()
    unknown = [w for w in words if w not in _WORD_VECTORS]
    if unknown:
      raise ConfigError(
        f"Caption {caption!r} has words {unknown} outside the shapes vocabulary {list(WORDS)}; "
        "use only those words."
      )
    if len(words) > CONTEXT_LEN:
      raise ConfigError(
        f"Caption {caption!r} has {len(words)} words; the shapes text encoder takes at most "
        f"{CONTEXT_LEN}."
      )
    if words:
      vectors = np.stack([_WORD_VECTORS[w] for w in words])  # [len(words), EMBED_DIM]
      context[n, : len(words)] = vectors
      pooled[n] = vectors.mean(axis=0)
  return context, pooled


def text_spec() -> TextSpec:
  """The spec of `encode_captions`: one encoder, "words", filling all rows and channels."""
  null_context, null_pooled = encode_captions([""])
  return TextSpec(
    context_len=CONTEXT_LEN,
    context_dim=EMBED_DIM,
    pooled_dim=EMBED_DIM,
    encoders=(EncoderSlot("words", (0, CONTEXT_LEN), (0, EMBED_DIM), (0, EMBED_DIM)),),
    null_context=null_context[0],
    null_pooled=null_pooled[0],
  )


class ShapesSource:
  """The shapes dataset as a grain random-access source, rendered per element.

  Element i shows caption i % C of the split's C captions (so every caption is equally frequent)
  with a jitter drawn from np.random.default_rng([seed, split_id, i]): it depends only on
  (seed, split, i). Elements are {"image": float32 [S, S, 3] in [-1, 1], "context": float32
  [CONTEXT_LEN, EMBED_DIM], "pooled": float32 [EMBED_DIM]}.
  """

  num_classes = None

  def __init__(
    self, split: str, image_size: int, size: int = 4096, seed: int = 0, buckets: tuple = ()
  ):
    if split not in SPLITS:
      raise ConfigError(
        f"config.data.split={split!r} is not a split of the shapes dataset; use one of "
        f"{list(SPLITS)}."
      )
    _check_image_size(image_size)
    for bucket in buckets:
      _check_image_size(tuple(bucket))
    if size <= 0:
      raise ConfigError(f"The shapes dataset size {size} must be positive.")
    self._split_id = SPLITS.index(split)
    self._combos = [
      combo for combo in _all_combos() if (combo in HELD_OUT) == (split == "held_out")
    ]
    self._captions = [caption_of(*combo) for combo in self._combos]
    self._context, self._pooled = encode_captions(self._captions)  # [C, L, D], [C, D]
    self._size = size
    self._seed = seed
    self.split = split
    self.image_size = image_size
    self.buckets = tuple(tuple(b) for b in buckets)
    self.text_spec = text_spec()

  def bucket_of(self) -> np.ndarray:
    """The bucket of every element [N] (with config.data.buckets): element i is in bucket
    (i // C) % K of K, so every caption is equally frequent in every bucket."""
    if not self.buckets:
      raise ValueError("This shapes source has no buckets.")
    return (np.arange(self._size) // len(self._combos)) % len(self.buckets)

  def __len__(self) -> int:
    return self._size

  def _check_index(self, index: int) -> int:
    if not 0 <= index < self._size:
      raise IndexError(f"Index {index} out of range for {self._size} shapes examples.")
    return index % len(self._combos)

  def caption(self, index: int) -> str:
    """The caption of element `index`."""
    return self._captions[self._check_index(index)]

  @property
  def captions(self) -> list[str]:
    """The captions of all elements, in order (as captions.txt lists them for stored data)."""
    return [self._captions[i % len(self._captions)] for i in range(self._size)]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    c = self._check_index(index)
    rng = np.random.default_rng([self._seed, self._split_id, index])
    size = self.image_size
    if self.buckets:
      size = self.buckets[(index // len(self._combos)) % len(self.buckets)]
    pixels = render(*self._combos[c], size, rng)
    return {
      "image": pixels.astype(np.float32) / 127.5 - 1.0,
      "context": self._context[c].copy(),
      "pooled": self._pooled[c].copy(),
    }
