"""Reads colour, shape and position back from images of the shapes dataset; scores captions.

Hand-written image analysis, no learned weights:
  foreground  pixels whose brightest channel exceeds FOREGROUND_THRESHOLD (the background is
              black); the largest 8-connected blob is the shape, and a blob smaller than
              MIN_AREA_FRACTION of the image counts as nothing drawn.
  position    the quadrant of the blob's centroid.
  colour      the palette colour nearest to the blob's mean colour, both divided by their
              brightest channel, so that a dimmer or blurred shape keeps its colour.
  shape       the best-fitting template: the image is projected on the blob's palette colour
              (giving each pixel's coverage, up to a gain), and each shape is rendered at the
              coverage's centroid with the side that gives its variance, sharp and 3x3-blurred;
              the shape with the smallest least-squares residual (gain fitted) wins. Moments and
              a fitted gain make the fit indifferent to the shape's size and brightness.
On renderings of every combination at 16x16 and 32x32 the reading is exact when sharp, blurred
(3x3 box or Gaussian, sigma 1 px) or noisy (Gaussian, sigma 0.15 in [-1, 1] units), and above 99%
with noise of sigma 0.3; tests/test_shapes.py checks the first three.
"""

from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from dit_jax.data import shapes

FOREGROUND_THRESHOLD = 0.4  # Brightest channel, in [0, 1] units.
MIN_AREA_FRACTION = 0.01
# Pixels this far from the blob (in pixels, 8-connected) still count towards its coverage.
_MARGIN = 2
# Each shape's variance (x plus y) in units of its side squared, and its centroid's drop below
# the centre of its bounding box in units of its side.
_SPREAD = {"circle": 1 / 8, "square": 1 / 6, "triangle": 7 / 72}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}

Reading = tuple[str | None, str | None, str | None]

_PALETTE = np.asarray(list(shapes.COLOURS.values()), np.float32)  # [4, 3]
_PALETTE_CHROMA = _PALETTE / _PALETTE.max(axis=1, keepdims=True)


def _to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"Expected RGB images [N, H, W, 3]; got shape {list(images.shape)}. Stack single images "
      "with images[None]."
    )
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"Expected uint8 or float images; got {images.dtype}.")
  return np.clip((images.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
  labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
  if count <= 1:
    return mask
  sizes = np.bincount(labels.ravel())[1:]  # Label 0 is the background.
  return labels == (np.argmax(sizes) + 1)


def _misfit(cover: np.ndarray, template: np.ndarray) -> float:
  """Residual of the least-squares fit cover ~ gain * template, relative to |cover|^2."""
  dot = float((cover * template).sum())
  return 1.0 - dot**2 / max(float((cover**2).sum() * (template**2).sum()), 1e-12)


def _match_shape(cover: np.ndarray) -> str:
  """The shape whose template, placed and sized by `cover`'s first and second moments, fits best.

  Args:
    cover: float [H, W], the shape's estimated coverage of each pixel, up to a constant gain
      (a dim shape is still a shape), and 0 away from the shape.
  """
  mass = max(float(cover.sum()), 1e-6)
  ys, xs = np.arange(cover.shape[0]) + 0.5, np.arange(cover.shape[1]) + 0.5
  rows, cols = cover.sum(axis=1), cover.sum(axis=0)  # [H], [W]
  cy, cx = float(rows @ ys) / mass, float(cols @ xs) / mass
  spread = float(rows @ (ys - cy) ** 2 + cols @ (xs - cx) ** 2) / mass
  errors = []
  for shape in shapes.SHAPES:
    fits = []
    # A 3x3 box blur adds 2/3 px^2 of variance per axis; the blurred template is sized for that.
    for blur, extra in ((False, 0.0), (True, 4 / 3)):
      side = np.sqrt(max(spread - extra, 0.25) / _SPREAD[shape])
      template = shapes.coverage(shape, cx, cy - _CENTROID_DROP[shape] * side, side, cover.shape)
      if blur:
        template = scipy.ndimage.uniform_filter(template, size=3, mode="constant")
      fits.append(_misfit(cover, template))
    errors.append(min(fits))
  return shapes.SHAPES[int(np.argmin(errors))]


def _read_one(image: np.ndarray) -> Reading:
  height, width = image.shape[:2]
  blob = _largest_blob(image.max(axis=-1) > FOREGROUND_THRESHOLD)  # [H, W]
  if blob.sum() < max(1, MIN_AREA_FRACTION * height * width):
    return None, None, None
  ys, xs = np.nonzero(blob)
  vertical = "top" if ys.mean() + 0.5 < height / 2 else "bottom"
  horizontal = "left" if xs.mean() + 0.5 < width / 2 else "right"
  mean = image[blob].mean(axis=0)  # [3]
  index = int(np.argmin(((_PALETTE_CHROMA - mean / max(mean.max(), 1e-6)) ** 2).sum(axis=1)))
  # Projecting on the shape's colour turns the image into coverage, with zero-mean noise.
  paint = _PALETTE[index] / 255.0
  cover = image @ paint / (paint @ paint)  # [H, W]
  near = scipy.ndimage.binary_dilation(blob, np.ones((3, 3)), iterations=_MARGIN)
  # Clipping noise to the valid range biases the background upwards; its median removes that.
  background = float(np.median(cover[~near])) if (~near).any() else 0.0
  cover = np.where(near, cover - background, 0.0)
  return list(shapes.COLOURS)[index], _match_shape(cover), f"{vertical} {horizontal}"


def read(images: np.ndarray) -> list[Reading]:
  """Reads (colour, shape, position) from each image; (None, None, None) if nothing is drawn.

  Args:
    images: [N, H, W, 3], uint8 in [0, 255] or float in [-1, 1] (the dataset's range).

  Returns:
    N tuples of names from shapes.COLOURS, shapes.SHAPES and shapes.POSITIONS.
  """
  return [_read_one(image) for image in _to_unit(images)]


def score(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
  """Scores images against the captions they were generated from.

  Args:
    images: [N, H, W, 3], as for `read`.
    captions: N captions of the shapes template.

  Returns:
    `accuracy`, the fraction of images with all three attributes right (the headline), and
    `colour_accuracy`, `shape_accuracy`, `position_accuracy`. An image with nothing drawn is
    wrong on all of them.
  """
  readings = read(images)
  if len(readings) != len(captions) or not len(captions):
    raise ValueError(
      f"Got {len(readings)} images and {len(captions)} captions; pass one caption per image "
      "and at least one of each."
    )
  truth = np.asarray([shapes.parse_caption(c) for c in captions], object)  # [N, 3]
  right = np.asarray(readings, object) == truth  # [N, 3]; None never equals a name.
  return {
    "accuracy": float(right.all(axis=1).mean()),
    "colour_accuracy": float(right[:, 0].mean()),
    "shape_accuracy": float(right[:, 1].mean()),
    "position_accuracy": float(right[:, 2].mean()),
  }
