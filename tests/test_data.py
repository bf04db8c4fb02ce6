"""Tests of dit_jax.data: sources, the grain pipeline, resumption and error messages."""

import gc
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dit_jax import data
from dit_jax.config_defaults import base_config

_NUM_IDS = 24


def _config(**data_fields):
  config = base_config()
  config.data.update(data_fields)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _ids(batch):
  """Recovers element ids from `id_latents` images, whether flipped or not."""
  return np.floor(batch["image"].min(axis=(1, 2, 3))).astype(int)


def _is_flipped(batch):
  return batch["image"][:, 0, 0, 0] > batch["image"][:, 0, -1, 0]


def _stream_ids(config, steps, **kwargs):
  """The ids of the first `steps` batches of an iterator built with `kwargs`, concatenated."""
  iterator = data.build_train_iterator(config, **kwargs)
  return np.concatenate([_ids(batch) for batch in _take(iterator, steps)])


@pytest.fixture
def id_latents(tmp_path):
  """A latents dir whose element i is i + w/10 at column w: ids survive flips, flips are visible."""
  columns = np.arange(4, dtype=np.float32) / 10
  latents = (
    np.arange(_NUM_IDS, dtype=np.float32)[:, None, None, None] + columns[None, None, :, None]
  )
  np.save(tmp_path / "latents.npy", np.broadcast_to(latents, (_NUM_IDS, 4, 4, 1)))
  np.save(tmp_path / "labels.npy", np.arange(_NUM_IDS) % 10)
  return _config(name="latents", path=str(tmp_path), image_size=4, channels=1)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_source(size):
  source = data.build_source(_config(name="digits", image_size=size))
  assert len(source) == 1797
  assert source.num_classes == 10
  element = source[5]
  assert element["image"].shape == (size, size, 1)
  assert element["image"].dtype == np.float32
  assert element["label"].dtype == np.int32
  images, labels = data.real_images(_config(name="digits", image_size=size))
  assert images.shape == (1797, size, size, 1)
  assert images.min() == -1.0 and images.max() == 1.0
  assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("size", [16, 32])
def test_digits_resize_keeps_classes(size):
  images, labels = data.real_images(_config(name="digits", image_size=size))
  flat = images.reshape(len(images), -1)
  means = np.stack([flat[labels == k].mean(0) for k in range(10)])  # [10, S*S]
  assert np.abs(means[0] - means[1]).mean() > 0.2
  # A nearest-class-mean classifier is ~90% accurate on the original 8x8 digits.
  distances = ((flat[:, None, :] - means[None]) ** 2).sum(-1)
  assert (distances.argmin(1) == labels).mean() > 0.85


def test_digits_rejects_bad_size_and_channels():
  with pytest.raises(data.DataError, match="config.data.image_size"):
    data.build_source(_config(name="digits", image_size=12))
  with pytest.raises(data.DataError, match="config.data.channels"):
    data.build_source(_config(name="digits", channels=3))
  with pytest.raises(data.DataError, match=r"config.data.split='test' is not a split of digits"):
    data.build_source(_config(name="digits", image_size=8, split="test"))


def test_digits_fit_and_held_out_split_all_of_them():
  images, labels = {}, {}
  for split in ("train", "fit", "held_out"):
    images[split], labels[split] = data.real_images(
      _config(name="digits", image_size=8, split=split)
    )
  assert (len(labels["fit"]), len(labels["held_out"])) == (1438, 359)

  # Together, in some order, exactly the 1,797 of "train"; every class on both sides.
  def rows(x, y):
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(x, y, strict=True))

  both = rows(images["fit"], labels["fit"]) + rows(images["held_out"], labels["held_out"])
  assert sorted(both) == rows(images["train"], labels["train"])
  for split in ("fit", "held_out"):
    assert set(labels[split].tolist()) == set(range(10))


def test_synthetic_source_is_deterministic_per_index():
  config = _config(name="synthetic", synthetic_size=50, image_size=8, channels=4)
  source = data.build_source(config, num_classes=7)
  assert len(source) == 50 and source.num_classes == 7
  first = source[3]
  assert first["image"].shape == (8, 8, 4) and first["image"].dtype == np.float32
  np.testing.assert_array_equal(
    first["image"], data.build_source(config, num_classes=7)[3]["image"]
  )
  assert not np.allclose(first["image"], source[4]["image"])
  labels = [int(source[i]["label"]) for i in range(50)]
  assert min(labels) >= 0 and max(labels) < 7 and len(set(labels)) > 3
  with pytest.raises(IndexError):
    source[50]


def test_iterator_shapes_and_dtypes():
  iterator = data.build_train_iterator(_config(name="digits", image_size=8), batch_size=16)
  for batch in _take(iterator, 3):
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_each_epoch_is_a_new_permutation(id_latents):
  ids = _stream_ids(id_latents, 2 * _NUM_IDS // 4, batch_size=4)
  epochs = ids[:_NUM_IDS], ids[_NUM_IDS:]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(_NUM_IDS))
  assert not np.array_equal(epochs[0], epochs[1])


def test_processes_get_disjoint_elements(id_latents):
  per_process = [
    _stream_ids(id_latents, 3, batch_size=4, process_index=p, process_count=2) for p in range(2)
  ]
  assert not set(per_process[0]) & set(per_process[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(per_process)), np.arange(_NUM_IDS))
  # The global batch at each step is the same whatever the number of processes.
  single = _stream_ids(id_latents, 3, batch_size=8)
  for step in range(3):
    together = np.concatenate([ids[4 * step : 4 * step + 4] for ids in per_process])
    np.testing.assert_array_equal(np.sort(together), np.sort(single[8 * step : 8 * step + 8]))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_reproduces_batches(id_latents, num_workers):
  id_latents.data.random_flip = True
  id_latents.data.num_workers = num_workers
  iterator = data.build_train_iterator(id_latents, batch_size=5, seed=3)
  _take(iterator, 7)  # Crosses an epoch boundary (24 elements) before saving.
  state = iterator.get_state()
  expected = _take(iterator, 6)
  resumed = data.build_train_iterator(id_latents, batch_size=5, seed=3)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 6), strict=True):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  # Without the state, a fresh iterator starts over rather than at the saved position.
  fresh = next(data.build_train_iterator(id_latents, batch_size=5, seed=3))
  assert not np.array_equal(fresh["image"], expected[0]["image"])
  for it in (iterator, resumed):
    it.close()
  gc.collect()


def test_flip_is_deterministic_and_flips_about_half(id_latents):
  id_latents.data.random_flip = True
  batches = _take(data.build_train_iterator(id_latents, batch_size=8), 12)
  again = _take(data.build_train_iterator(id_latents, batch_size=8), 12)
  other_seed = _take(data.build_train_iterator(id_latents, batch_size=8, seed=1), 12)
  flipped = np.concatenate([_is_flipped(b) for b in batches])
  np.testing.assert_array_equal(flipped, np.concatenate([_is_flipped(b) for b in again]))
  assert not np.array_equal(flipped, np.concatenate([_is_flipped(b) for b in other_seed]))
  assert 0.3 < flipped.mean() < 0.7
  # A flipped element is exactly the mirrored original.
  source = data.build_source(id_latents)
  for image, ident, flip in zip(batches[0]["image"], _ids(batches[0]), flipped[:8], strict=True):
    original = source[ident]["image"]
    np.testing.assert_array_equal(image, original[:, ::-1] if flip else original)
  id_latents.data.random_flip = False
  unflipped = _take(data.build_train_iterator(id_latents, batch_size=8), 12)
  assert not np.concatenate([_is_flipped(b) for b in unflipped]).any()


def test_batch_size_validation(id_latents):
  with pytest.raises(data.DataError, match="positive"):
    data.build_train_iterator(id_latents, batch_size=0)
  with pytest.raises(data.DataError, match="fewer than one global batch"):
    data.build_train_iterator(id_latents, batch_size=16, process_count=2)


def test_real_images_is_ordered_and_unflipped(id_latents):
  id_latents.data.random_flip = True
  images, labels = data.real_images(id_latents)
  np.testing.assert_array_equal(_ids({"image": images}), np.arange(_NUM_IDS))
  assert not _is_flipped({"image": images}).any()
  np.testing.assert_array_equal(labels, np.arange(_NUM_IDS) % 10)
  images, _ = data.real_images(id_latents, max_images=6)
  np.testing.assert_array_equal(_ids({"image": images}), [0, 4, 8, 12, 16, 20])


def test_tfds_mnist_resize_and_channels():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.data_source("mnist", split="train", download=False)
    native = data.build_source(_config(name="tfds:mnist", image_size=28, channels=1))
    halved = data.build_source(_config(name="tfds:mnist", image_size=14, channels=1))
    rgb = data.build_source(_config(name="tfds:mnist", image_size=16, channels=3))
    assert len(native) == 6 and native.num_classes == 10
    for i in range(6):
      pixels = raw[i]["image"].astype(np.float32)  # [28, 28, 1] uint8 values.
      np.testing.assert_allclose(native[i]["image"], pixels / 127.5 - 1.0, atol=1e-6)
      assert native[i]["label"] == raw[i]["label"]
      # 28 -> 14 is one box halving: each pixel is its 2x2 block mean, rounded to uint8.
      blocks = pixels.reshape(14, 2, 14, 2, 1).mean(axis=(1, 3)) / 127.5 - 1.0
      np.testing.assert_allclose(halved[i]["image"], blocks, atol=1.01 / 127.5)
      image = rgb[i]["image"]
      assert image.shape == (16, 16, 3) and image.dtype == np.float32
      assert -1.0 <= image.min() and image.max() <= 1.0
      np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_tfds_rgb_to_gray():
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.data_source("cifar10", split="train", download=False)
    gray = data.build_source(_config(name="tfds:cifar10", image_size=32, channels=1))
    pixels = raw[0]["image"].astype(np.float32)
    luma = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    assert gray[0]["image"].shape == (32, 32, 1)
    np.testing.assert_allclose(gray[0]["image"][..., 0], luma / 127.5 - 1.0, atol=1.01 / 127.5)


def test_tfds_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
  with pytest.raises(data.DataError, match=r"'tfds:mnist'.*tfds build mnist"):
    data.build_source(_config(name="tfds:mnist"))
  with pytest.raises(data.DataError, match="tfds:no_such_dataset_xyz"):
    data.build_source(_config(name="tfds:no_such_dataset_xyz"))
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(data.DataError, match="config.data.image_key"):
      data.build_source(_config(name="tfds:mnist", image_key="img"))


def _write_image(path, pixels):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def test_folder_source(tmp_path):
  # A 24x8 image whose central 8x8 square is white: the center crop must keep only that (its
  # short side is the target's, so ADM's crop resizes nothing).
  band = np.zeros((8, 24, 3), np.uint8)
  band[:, 8:16] = 255
  _write_image(tmp_path / "cats" / "band.png", band)
  _write_image(tmp_path / "cats" / "big.PNG", np.full((64, 48, 3), 255, np.uint8))
  _write_image(tmp_path / "dogs" / "red.jpg", np.tile([255, 0, 0], (12, 12, 1)))
  (tmp_path / "dogs" / "notes.txt").write_text("not an image")
  (tmp_path / ".hidden").mkdir()

  rgb = data.build_source(_config(name="folder", path=str(tmp_path), image_size=8, channels=3))
  assert len(rgb) == 3 and rgb.num_classes == 2
  assert [int(rgb[i]["label"]) for i in range(3)] == [0, 0, 1]
  for i in range(2):  # Both cats images are white after cropping.
    assert rgb[i]["image"].shape == (8, 8, 3)
    np.testing.assert_allclose(rgb[i]["image"], 1.0, atol=1e-6)
  np.testing.assert_allclose(rgb[2]["image"].mean(axis=(0, 1)), [1.0, -1.0, -1.0], atol=0.05)

  gray = data.build_source(_config(name="folder", path=str(tmp_path), image_size=8, channels=1))
  assert gray[2]["image"].shape == (8, 8, 1)
  np.testing.assert_allclose(gray[2]["image"].mean(), 0.299 * 255 / 127.5 - 1.0, atol=0.05)

  corrupt = tmp_path / "dogs" / "zz_broken.png"
  corrupt.write_bytes(b"\x89PNG not really")
  source = data.build_source(_config(name="folder", path=str(tmp_path), image_size=8, channels=3))
  with pytest.raises(data.DataError, match="zz_broken.png.*remove or fix"):
    source[3]


def test_folder_errors(tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(data.DataError, match=r"config.data.path=.*missing.*does not exist"):
    data.build_source(_config(name="folder", path=missing, channels=3))
  with pytest.raises(data.DataError, match="no class sub-folders"):
    data.build_source(_config(name="folder", path=str(tmp_path), channels=3))
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(data.DataError, match="empty_class.*has no images"):
    data.build_source(_config(name="folder", path=str(tmp_path), channels=3))
  with pytest.raises(data.DataError, match="config.data.channels"):
    data.build_source(_config(name="folder", path=str(tmp_path), channels=2))


def test_latents_round_trip(tmp_path):
  latents = np.random.default_rng(0).standard_normal((64, 4, 4, 3)).astype(np.float16)
  np.save(tmp_path / "latents.npy", latents)
  np.save(tmp_path / "labels.npy", np.arange(64, dtype=np.int64) % 3)
  config = _config(name="latents", path=str(tmp_path), image_size=4, channels=3, latent_scale=0.5)
  source = data.build_source(config)
  assert len(source) == 64 and source.num_classes == 3
  for i in range(64):
    assert source[i]["image"].dtype == np.float32
    np.testing.assert_array_equal(source[i]["image"], latents[i].astype(np.float32) * 0.5)
  assert source[5]["label"] == 2
  # grain workers receive a pickled source: it must reopen the memmap, not carry the array.
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[4]["image"], source[4]["image"])
  assert len(pickle.dumps(source)) < latents.nbytes // 2

  config.data.image_size = 8
  with pytest.raises(data.DataError, match=r"\[4, 4, 3\].*config.data.image_size=8"):
    data.build_source(config)
  config.data.update(image_size=4, channels=4)
  with pytest.raises(data.DataError, match="config.data.channels=4"):
    data.build_source(config)


def test_latents_errors(tmp_path):
  with pytest.raises(data.DataError, match=r"config.data.path=.*latents.npy"):
    data.build_source(_config(name="latents", path=str(tmp_path)))
  np.save(tmp_path / "latents.npy", np.zeros((3, 4, 4, 1), np.float32))
  np.save(tmp_path / "labels.npy", np.array([0, 11, 1]))
  with pytest.raises(data.DataError, match="config.model.num_classes=12"):
    data.build_source(_config(name="latents", path=str(tmp_path), image_size=4), num_classes=10)
  np.save(tmp_path / "labels.npy", np.array([0, 1]))
  with pytest.raises(data.DataError, match="labels.npy"):
    data.build_source(_config(name="latents", path=str(tmp_path), image_size=4))


def test_unknown_name_lists_valid_names():
  with pytest.raises(data.DataError, match=r"config.data.name='imagenet'.*digits.*latents"):
    data.build_source(_config(name="imagenet"))


def _noiseless_ids(batch):
  """Element ids of `id_latents` images that carry small noise (the columns add 0.15 on average)."""
  return np.round(batch["image"].mean(axis=(1, 2, 3)) - 0.15).astype(int)


def test_latents_std_draws_afresh_each_epoch_and_resumes(id_latents, tmp_path):
  np.save(tmp_path / "latents_std.npy", np.full((_NUM_IDS, 4, 4, 1), 0.01, np.float32))
  source = data.build_source(id_latents)
  assert source.has_std and not source.has_flip
  view = source.training_view()
  # grain workers get a pickled view: the memmaps (1,536 bytes each) are reopened, not copied.
  assert len(pickle.dumps(view)) < 4 * 4 * _NUM_IDS * 4
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(view))[3]["latent_std"], np.float32(0.01))
  # Evaluation reads the posterior means.
  images, _ = data.real_images(id_latents)
  np.testing.assert_array_equal(images, np.load(tmp_path / "latents.npy"))

  epochs = _take(data.build_train_iterator(id_latents, batch_size=4, seed=2), 2 * _NUM_IDS // 4)
  samples = {}
  for batch in epochs:
    for i, image in zip(_noiseless_ids(batch), batch["image"], strict=True):
      samples.setdefault(int(i), []).append(image)
  assert sorted(samples) == list(range(_NUM_IDS))
  means = np.load(tmp_path / "latents.npy")
  noise = np.stack([s - means[i] for i, pair in samples.items() for s in pair])
  assert 0.008 < noise.std() < 0.012 and abs(noise.mean()) < 0.002
  assert all(len(pair) == 2 and not np.array_equal(*pair) for pair in samples.values())

  iterator = data.build_train_iterator(id_latents, batch_size=4, seed=2)
  first = _take(iterator, 3)
  state = iterator.get_state()
  rest = _take(iterator, 3)
  resumed = data.build_train_iterator(id_latents, batch_size=4, seed=2)
  resumed.set_state(state)
  for a, b in zip(first + rest, epochs[:6], strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(_take(resumed, 3), rest, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_flipped_latents_are_picked_half_the_time(id_latents, tmp_path):
  # The "flipped image's latent" is the negated latent: its picks show in the sign. It has no
  # noise (std 0) while the plain latent has some, so each pick carries its own std.
  means = np.load(tmp_path / "latents.npy")
  np.save(tmp_path / "latents_flip.npy", -means)
  np.save(tmp_path / "latents_std.npy", np.full(means.shape, 0.01, np.float32))
  np.save(tmp_path / "latents_flip_std.npy", np.zeros(means.shape, np.float32))
  id_latents.data.random_flip = True
  batches = _take(data.build_train_iterator(id_latents, batch_size=8), 12)
  images = np.concatenate([b["image"] for b in batches])
  picked = images.mean(axis=(1, 2, 3)) < 0
  assert 0.3 < picked.mean() < 0.7
  ids = np.round(-images[picked].mean(axis=(1, 2, 3)) - 0.15).astype(int)
  np.testing.assert_array_equal(images[picked], -means[ids])  # Exact: the flip's std is 0.
  plain = images[~picked]
  assert (plain[:, 0, 0, 0] < plain[:, 0, -1, 0]).all()  # Never flipped as a tensor.
  assert not np.isin(plain, means).all()  # Drawn from the posterior.

  id_latents.data.random_flip = False
  batches = _take(data.build_train_iterator(id_latents, batch_size=8), 12)
  assert all((b["image"] > -0.5).all() for b in batches)

  (tmp_path / "latents_flip_std.npy").unlink()
  with pytest.raises(data.DataError, match="no latents_flip_std.npy.*--flip --std"):
    data.build_source(id_latents)
