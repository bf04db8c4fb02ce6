"""The captioned shapes dataset, its fixed text encoder, and the checker that scores samples."""

import itertools

import numpy as np
import pytest
import scipy.ndimage

from dit_jax.data import shapes
from dit_jax.data.text import TextSpec
from dit_jax.errors import ConfigError
from dit_jax.evaluation import shapes_checker

JITTERS = 3  # Renderings of each combination per image size.


@pytest.fixture(scope="module", params=shapes.IMAGE_SIZES)
def rendered(request):
  """Each combination JITTERS times, from both splits: (images float [N, S, S, 3], captions)."""
  size = request.param
  images, captions = [], []
  for split, count in (("train", 40), ("held_out", 8)):
    # Element i shows caption i % count: count * JITTERS elements show each caption JITTERS times.
    source = shapes.ShapesSource(split, size, size=count * JITTERS, seed=3)
    images += [source[i]["image"] for i in range(len(source))]
    captions += source.captions
  assert sorted(set(captions)) == sorted(shapes.all_captions())
  return np.stack(images), captions


# --- Captions and splits -------------------------------------------------------------------------


def test_captions_round_trip():
  combos = list(itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS))
  captions = shapes.all_captions()
  assert len(set(captions)) == len(combos) == 48
  assert captions[0] == "a red circle at the top left"
  for combo, caption in zip(combos, captions, strict=True):
    assert shapes.caption_of(*combo) == caption
    assert shapes.parse_caption(caption) == combo


@pytest.mark.parametrize(
  "caption",
  ["", "a red circle", "a purple circle at the top left", "a red circle at the middle left",
   "a red circle at the top left now", "the red circle at the top left"],
)  # fmt: skip
def test_parse_caption_rejects_other_grammar(caption):
  with pytest.raises(ConfigError, match="is not of the form"):
    shapes.parse_caption(caption)


def test_held_out_split_is_disjoint_and_every_pair_is_seen_in_training():
  train, held_out = shapes.train_captions(), shapes.held_out_captions()
  assert len(held_out) == 8 and len(set(held_out)) == 8
  assert not set(train) & set(held_out)
  assert sorted(train + held_out) == sorted(shapes.all_captions())
  train_combos = [shapes.parse_caption(c) for c in train]
  for attribute, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS)):
    counts = [sum(combo[attribute] == v for combo in train_combos) for v in values]
    assert min(counts) >= 10, (values, counts)
  # Only the triple is new: each pair of a held-out combination's attributes occurs in training.
  for combo in (shapes.parse_caption(c) for c in held_out):
    for i, j in ((0, 1), (0, 2), (1, 2)):
      assert any(t[i] == combo[i] and t[j] == combo[j] for t in train_combos), (combo, i, j)


# --- Rendering and the source -------------------------------------------------------------------


@pytest.mark.parametrize("size", shapes.IMAGE_SIZES)
def test_render_draws_one_shape_of_the_palette_colour_in_its_quadrant(size):
  rng = np.random.default_rng(0)
  for colour, shape, position in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS):
    image = shapes.render(colour, shape, position, size, rng)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    lit = image.max(axis=-1) > 0
    ys, xs = np.nonzero(lit)
    top, left = position.split()[0] == "top", position.split()[1] == "left"
    # The shape keeps to its quadrant, give or take a partly lit pixel across the midline.
    assert (ys.max() < size // 2 + 1) if top else (ys.min() >= size // 2 - 1)
    assert (xs.max() < size // 2 + 1) if left else (xs.min() >= size // 2 - 1)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    assert 0.3 * size <= extent <= 0.5 * size, (colour, shape, position, extent)
    # Fully covered pixels carry exactly the palette colour.
    brightest = image.reshape(-1, 3)[np.argmax(image.sum(axis=-1))]
    np.testing.assert_array_equal(brightest, shapes.COLOURS[colour])


def test_render_rejects_unsupported_sizes_and_names():
  with pytest.raises(ConfigError, match="config.data.image_size=24"):
    shapes.render("red", "circle", "top left", 24)
  with pytest.raises(ConfigError, match="colour must be one of"):
    shapes.render("purple", "circle", "top left", 16)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_source_elements_are_deterministic_and_well_formed(split):
  source = shapes.ShapesSource(split, 16, size=20, seed=5)
  again = shapes.ShapesSource(split, 16, size=20, seed=5)
  other_seed = shapes.ShapesSource(split, 16, size=20, seed=6)
  expected = set(shapes.train_captions() if split == "train" else shapes.held_out_captions())
  assert len(source) == 20 and source.num_classes is None
  assert isinstance(source.text_spec, TextSpec)
  assert source.captions == [source.caption(i) for i in range(20)]
  assert set(source.captions) <= expected
  differs = 0
  for i in (19, 0, 7):  # Out of order: an element must not depend on what was read before.
    element = source[i]
    assert sorted(element) == ["context", "image", "pooled"]
    assert element["image"].shape == (16, 16, 3) and element["image"].dtype == np.float32
    assert element["context"].shape == (8, 32) and element["context"].dtype == np.float32
    assert element["pooled"].shape == (32,) and element["pooled"].dtype == np.float32
    assert element["image"].min() >= -1.0 and element["image"].max() <= 1.0
    assert element["image"].min() == -1.0 and element["image"].max() > 0.5  # Black and a shape.
    context, pooled = shapes.encode_captions([source.caption(i)])
    np.testing.assert_array_equal(element["context"], context[0])
    np.testing.assert_array_equal(element["pooled"], pooled[0])
    for key in element:
      np.testing.assert_array_equal(element[key], again[i][key])
    differs += not np.array_equal(element["image"], other_seed[i]["image"])
  assert differs == 3
  with pytest.raises(IndexError):
    source[20]


def test_source_rejects_bad_arguments():
  with pytest.raises(ConfigError, match="split"):
    shapes.ShapesSource("validation", 16)
  with pytest.raises(ConfigError, match="config.data.image_size=64"):
    shapes.ShapesSource("train", 64)


# --- The text encoder ---------------------------------------------------------------------------


def test_encode_captions_stacks_unit_word_vectors():
  captions = shapes.all_captions()
  context, pooled = shapes.encode_captions(captions)
  assert context.shape == (48, shapes.CONTEXT_LEN, shapes.EMBED_DIM) and context.dtype == np.float32
  assert pooled.shape == (48, shapes.EMBED_DIM) and pooled.dtype == np.float32
  norms = np.linalg.norm(context, axis=-1)  # [48, 8]
  np.testing.assert_allclose(norms[:, :7], 1.0, atol=1e-5)  # Seven words per caption.
  np.testing.assert_array_equal(context[:, 7], 0.0)  # Padding.
  np.testing.assert_allclose(pooled, context[:, :7].mean(axis=1), atol=1e-6)
  # The same word has the same vector wherever it appears; different captions differ.
  np.testing.assert_array_equal(context[0, 0], context[-1, 0])  # "a"
  assert len({p.tobytes() for p in pooled}) == 48
  assert len({c.tobytes() for c in context}) == 48


def test_empty_caption_is_zero_and_is_the_spec_null():
  context, pooled = shapes.encode_captions(["", "a red circle at the top left"])
  assert not context[0].any() and not pooled[0].any()
  assert context[1].any()
  spec = shapes.text_spec()
  assert (spec.context_len, spec.context_dim, spec.pooled_dim) == (8, 32, 32)
  np.testing.assert_array_equal(spec.null_context, context[0])
  np.testing.assert_array_equal(spec.null_pooled, pooled[0])
  assert [slot.name for slot in spec.encoders] == ["words"]
  slot = spec.encoders[0]
  assert (slot.seq, slot.context_channels, slot.pooled_channels) == ((0, 8), (0, 32), (0, 32))


def test_encode_captions_rejects_unknown_words_and_long_captions():
  with pytest.raises(ConfigError, match="'purple'.*vocabulary.*'triangle'"):
    shapes.encode_captions(["a purple circle at the top left"])
  with pytest.raises(ValueError, match="at most 8"):
    shapes.encode_captions(["a red circle at the top left a red"])


# --- The checker --------------------------------------------------------------------------------


def test_checker_reads_every_rendering(rendered):
  images, captions = rendered
  assert shapes_checker.score(images, captions) == {
    "accuracy": 1.0,
    "colour_accuracy": 1.0,
    "shape_accuracy": 1.0,
    "position_accuracy": 1.0,
  }
  # uint8 images in [0, 255] read the same as float images in [-1, 1].
  pixels = np.round((images + 1.0) * 127.5).astype(np.uint8)
  assert shapes_checker.read(pixels[:24]) == shapes_checker.read(images[:24])


def test_checker_is_robust_to_noise_and_blur(rendered):
  images, captions = rendered
  noise = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32)
  noisy = np.clip(images + 0.15 * noise, -1.0, 1.0)
  blurred = scipy.ndimage.uniform_filter(images, size=(1, 3, 3, 1), mode="constant", cval=-1.0)
  assert shapes_checker.score(noisy, captions)["accuracy"] >= 0.97
  assert shapes_checker.score(blurred, captions)["accuracy"] >= 0.97


def test_checker_scores_mismatched_captions_near_chance(rendered):
  images, captions = rendered
  shuffled = [captions[i] for i in np.random.default_rng(1).permutation(len(captions))]
  scores = shapes_checker.score(images, shuffled)
  assert scores["accuracy"] < 0.3
  for key in ("colour_accuracy", "shape_accuracy", "position_accuracy"):
    assert scores[key] < 0.6, scores


@pytest.mark.parametrize("size", shapes.IMAGE_SIZES)
def test_checker_scores_empty_images_zero(size):
  blank = np.full((3, size, size, 3), -1.0, np.float32)
  speck = blank.copy()
  speck[:, 2, 2] = 1.0  # One lit pixel is noise, not a shape.
  faint = np.random.default_rng(0).normal(-1.0, 0.15, blank.shape).clip(-1, 1)
  captions = shapes.held_out_captions()[:3]
  for images in (blank, speck, faint, np.zeros(blank.shape, np.uint8)):
    assert shapes_checker.read(images) == [(None, None, None)] * 3
    assert shapes_checker.score(images, captions)["accuracy"] == 0.0
  with pytest.raises(ValueError, match="captions"):
    shapes_checker.score(blank, captions[:2])
