"""Tests of dit_jax.tools.encode_latents and of the `latents` source reading what it writes."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dit_jax import data, parallel
from dit_jax.config_defaults import base_config
from dit_jax.data import latents
from dit_jax.errors import ConfigError
from dit_jax.models import autoencoder
from dit_jax.tools import encode_latents as el
from dit_jax.vae import VAE

# Odd sizes, so that ADM's halving, rounding and crop offsets all matter. (width, height)
_SIZES = {"cat": [(23, 17), (40, 31), (19, 19)], "dog": [(45, 27), (17, 36), (33, 50), (9, 13)]}
_IMAGE_SIZE = 8  # Pixels; the tiny VAE's downsample factor is 2, so latents are 4x4x4.
_BATCH = 3  # 7 images: chunks of 3, 3, 1.
_VAE_CONFIG = autoencoder.AutoencoderConfig(
  block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8
)


def _adm_reference(image, size):
  """guided-diffusion's center_crop_arr, transcribed independently, on a PIL image."""
  while min(image.width, image.height) >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  ratio = size / min(image.width, image.height)
  image = image.resize(
    (round(image.width * ratio), round(image.height * ratio)), resample=Image.BICUBIC
  )
  array = np.array(image)
  y, x = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[y : y + size, x : x + size]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_adm_center_crop_matches_the_reference(mode):
  rng = np.random.default_rng(1)
  # (width, height, target): several halvings, none, an exact 2x, odd targets, tall and wide.
  cases = [(257, 301, 16), (301, 129, 15), (33, 64, 16), (64, 32, 16), (17, 16, 16), (9, 31, 7)]
  for w, h, size in cases:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    got = np.asarray(data.sources.adm_center_crop(image, size))
    assert got.dtype == np.uint8 and got.shape[:2] == (size, size)
    np.testing.assert_array_equal(got, _adm_reference(image, size), err_msg=f"{w}x{h}->{size}")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vae"))
  autoencoder.save_diffusers(path, _VAE_CONFIG, autoencoder.random_params(_VAE_CONFIG, seed=0))
  return path


@pytest.fixture(scope="module")
def vae(vae_dir):
  return VAE.load(vae_dir, parallel.make_mesh(base_config()))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, sizes in _SIZES.items():
    (root / name).mkdir()
    for i, (w, h) in enumerate(sizes):
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")
  return str(root)


def _latent_config(**data_fields):
  """A DiT config on 4x4x4 latents, as a training config for the tiny VAE's output."""
  config = base_config()
  fields = dict(name="latents", image_size=_IMAGE_SIZE // 2, channels=4, latent_scale=0.18215)
  config.data.update({**fields, **data_fields})
  return config


def _encode(config, vae_dir, vae, out, **kwargs):
  kwargs = {"source": "folder", "batch_size": _BATCH, **kwargs}
  return el.encode_latents(config, vae_dir, str(out), vae=vae, **kwargs)


def _files(directory):
  """Every file of an encode_latents directory, as arrays (npy) or dicts (json)."""
  out = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.endswith(".npy"):
      out[name] = np.load(path)
    else:
      with open(path) as f:
        out[name] = json.load(f)
  return out


@pytest.fixture(scope="module")
def full(tmp_path_factory, vae_dir, vae, folder):
  """An uninterrupted --flip --std run on the folder, stored as float32."""
  out = tmp_path_factory.mktemp("full") / "latents"
  config = _latent_config()
  _encode(config, vae_dir, vae, out, source_path=folder, flip=True, std=True, dtype="float32")
  return out


def _reference_images(folder):
  """The folder's images, cropped by the reference rule, in [-1, 1], and their labels."""
  images, labels = [], []
  for label, name in enumerate(sorted(_SIZES)):
    for i in range(len(_SIZES[name])):
      with Image.open(os.path.join(folder, name, f"{i}.png")) as image:
        images.append(_adm_reference(image.convert("RGB"), _IMAGE_SIZE))
      labels.append(label)
  return np.stack(images).astype(np.float32) / 127.5 - 1.0, np.array(labels)


def _encode_in_chunks(vae, images):
  """VAE.encode over the tool's chunks (padded to the batch), so the compiled shapes match."""
  means, stds = [], []
  for begin in range(0, len(images), _BATCH):
    chunk = images[begin : begin + _BATCH]
    padded = np.concatenate([chunk, np.zeros((_BATCH - len(chunk), *chunk.shape[1:]), np.float32)])
    mean, std = vae.encode(padded)
    means.append(mean[: len(chunk)])
    stds.append(std[: len(chunk)])
  return np.concatenate(means), np.concatenate(stds)


def test_folder_latents_match_the_vae(full, vae_dir, vae, folder):
  files = _files(full)
  assert sorted(files) == sorted(
    [
      "labels.npy",
      "latents.json",
      "latents.npy",
      "latents_flip.npy",
      "latents_flip_std.npy",
      "latents_std.npy",
      "progress.json",
    ]
  )
  images, labels = _reference_images(folder)
  np.testing.assert_array_equal(files["labels.npy"], labels)
  assert files["progress.json"] == {"rows": 7}
  meta = files["latents.json"]
  assert meta == {
    "vae": os.path.abspath(vae_dir),
    "scaling_factor": 0.18215,
    "shift_factor": 0.0,
    "latent_channels": 4,
    "downsample_factor": 2,
    "image_size": _IMAGE_SIZE,
    "crop": "adm_center",
    "flip": True,
    "std": True,
    "count": 7,
    "source": "folder",
    "source_path": folder,
    "source_split": "train",
    "dtype": "float32",
    "compute_dtype": "float32",
    "batch_size": _BATCH,
    "has_labels": True,
    "format": "npy",
    "shard_size": 0,
    "buckets": "",
  }
  mean, std = _encode_in_chunks(vae, images)
  assert files["latents.npy"].shape == (7, 4, 4, 4)
  np.testing.assert_array_equal(files["latents.npy"], mean)
  np.testing.assert_array_equal(files["latents_std.npy"], std)
  assert (std > 0).all() and np.abs(mean).max() > 0.01
  flip_mean, flip_std = _encode_in_chunks(vae, images[:, :, ::-1])
  np.testing.assert_array_equal(files["latents_flip.npy"], flip_mean)
  np.testing.assert_array_equal(files["latents_flip_std.npy"], flip_std)
  assert not np.allclose(flip_mean, mean)


def test_killed_run_resumes_to_the_same_files(full, tmp_path, vae_dir, vae, folder):
  out = tmp_path / "latents"
  config = _latent_config()
  args = dict(source_path=folder, flip=True, std=True, dtype="float32")
  _encode(config, vae_dir, vae, out, max_chunks=1, **args)
  assert latents.read_progress(str(out)) == _BATCH
  # A partly written directory is not training data.
  with pytest.raises(data.DataError, match=r"incomplete \(3 of 7.*same arguments"):
    data.build_source(_latent_config(path=str(out)))
  _encode(config, vae_dir, vae, out, max_chunks=1, **args)
  assert latents.read_progress(str(out)) == 2 * _BATCH
  _encode(config, vae_dir, vae, out, **args)
  resumed, uninterrupted = _files(out), _files(full)
  assert resumed.keys() == uninterrupted.keys()
  for name, value in uninterrupted.items():
    if name.endswith(".npy"):
      assert resumed[name].dtype == value.dtype
      np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    else:
      assert resumed[name] == value, name


def test_gs_latents_are_array_record_shards_that_resume_and_read_as_the_npy_ones(
  full, gcs, vae_dir, vae, folder
):
  """encode_latents to gs:// writes sharded ArrayRecord files; killed after each shard and
  rerun, it writes the bytes of an uninterrupted run; the `latents` source reads them from the
  bucket as the same examples (latent, std, flips, label) as the .npy layout of the same run."""
  from dit_jax import storage
  from dit_jax.data import records

  config = _latent_config()
  args = dict(source_path=folder, flip=True, std=True, dtype="float32", shard_size=_BATCH)
  whole, killed = gcs.url("latents"), gcs.url("killed")
  _encode(config, vae_dir, vae, whole, **args)
  names = [records.shard_name(k, i, 3) for i in range(3) for k in ("labels", "latents")]
  assert storage.listdir(whole) == sorted([latents.METADATA_FILE, *names])
  for done in (1, 2):
    _encode(config, vae_dir, vae, killed, max_chunks=1, **args)
    assert len([n for n in storage.listdir(killed) if n.startswith("latents-")]) == done
    with pytest.raises(data.DataError, match=rf"incomplete \({3 * done} of 7"):
      data.build_source(_latent_config(path=killed))
  _encode(config, vae_dir, vae, killed, **args)
  for name in storage.listdir(whole):
    assert storage.read_bytes(f"{killed}/{name}") == storage.read_bytes(f"{whole}/{name}"), name
  sharded = data.build_source(_latent_config(path=whole))
  local = data.build_source(_latent_config(path=str(full)))
  assert (len(sharded), sharded.num_classes) == (7, 2) and sharded.metadata.format == "array_record"
  for i in range(7):
    got, want = sharded.read(i, variants=True), local.read(i, variants=True)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{i} {key}")
  # The training pipeline (grain, reading threads) gives the same batches from either layout.
  it_gs = data.build_train_iterator(_latent_config(path=whole, random_flip=True), batch_size=4)
  it_npy = data.build_train_iterator(_latent_config(path=str(full), random_flip=True), batch_size=4)
  for _ in range(3):
    got, want = next(it_gs), next(it_npy)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(data.DataError, match=r"latents in a bucket are ArrayRecord shards"):
    data.build_source(_latent_config(path=gcs.url("nothing")))
  with pytest.raises(ConfigError, match=r"--format=npy .* cannot hold; use --format=array_record"):
    _encode(config, vae_dir, vae, gcs.url("npy"), format="npy")


def test_an_image_folder_in_a_bucket_reads_as_on_disk(gcs, folder):
  import _gcs

  url = _gcs.upload(folder, gcs.url("images"))
  config = base_config()
  config.data.update(name="folder", image_size=_IMAGE_SIZE, channels=3)
  config.data.path = url
  remote = data.build_source(config)
  config.data.path = folder
  local = data.build_source(config)
  assert remote.classes == local.classes and len(remote) == len(local) == 7
  for i in range(7):
    got, want = remote[i], local[i]
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["label"] == want["label"]


def test_latents_source_reads_the_scaled_latents(full, vae_dir):
  stored = np.load(full / "latents.npy")
  config = _latent_config(path=str(full))
  source = data.build_source(config)
  assert source.metadata.count == 7 and source.has_std and source.has_flip
  for i in range(7):
    np.testing.assert_array_equal(source[i]["image"], stored[i])  # Not scaled again.
  config.vae.path = vae_dir
  data.build_source(config)  # The same VAE decodes them: accepted.

  config.data.latent_scale = 1.0
  with pytest.raises(
    data.DataError,
    match=r"scaling_factor=0.18215 \(shift_factor=0.0\).*latent_scale=1.0; set "
    r"config.data.latent_scale=0.18215",
  ):
    data.build_source(config)


def test_decoding_vae_with_other_factors_is_refused(full, tmp_path):
  other = autoencoder.AutoencoderConfig(
    block_out_channels=(32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    scaling_factor=1.5305,
    shift_factor=0.0609,
  )
  with open(tmp_path / autoencoder.CONFIG_FILE, "w") as f:  # The factors are all that is read.
    json.dump(other.to_diffusers(), f)
  config = _latent_config(path=str(full))
  config.vae.path = str(tmp_path)
  with pytest.raises(data.DataError, match=r"1.5305 and 0.0609; set config.vae.path"):
    data.build_source(config)


def test_digits_latents(tmp_path, vae_dir, vae):
  # quickstart's digits (16x16 grayscale, repeated to RGB) -> 8x8x4 latents; two chunks only.
  config = base_config()  # digits, 16x16, 1 channel.
  out = tmp_path / "digits"
  meta = el.encode_latents(config, vae_dir, str(out), vae=vae, batch_size=16, max_chunks=2)
  assert (meta.count, meta.image_size, meta.crop, meta.dtype) == (1797, 16, "none", "float16")
  stored = np.load(out / "latents.npy", mmap_mode="r")
  assert stored.shape == (1797, 8, 8, 4) and stored.dtype == np.float16
  assert latents.read_progress(str(out)) == 32
  images, labels = data.real_images(config)
  mean, _ = vae.encode(np.repeat(images[:16], 3, axis=-1))
  np.testing.assert_array_equal(stored[:16], mean.astype(np.float16))
  np.testing.assert_array_equal(np.load(out / "labels.npy")[:32], labels[:32])
  assert not os.path.exists(out / "latents_std.npy")


def test_errors_name_the_problem_and_keep_the_files(full, tmp_path, vae_dir, vae, folder):
  before = _files(full)
  other_vae = tmp_path / "other_vae"
  with pytest.raises(ConfigError, match=r"other arguments: vae=.*this run: .*other_vae.*resume"):
    _encode(_latent_config(), str(other_vae), vae, full, source_path=folder, flip=True, std=True)
  with pytest.raises(ConfigError, match=r"other arguments: flip=True \(this run: False\)"):
    _encode(_latent_config(), vae_dir, vae, full, source_path=folder, std=True, dtype="float32")
  after = _files(full)
  assert after.keys() == before.keys()
  for name, value in before.items():
    if name.endswith(".npy"):
      np.testing.assert_array_equal(after[name], value, err_msg=name)
    else:
      assert after[name] == value, name

  with pytest.raises(ConfigError, match=r"4-channel latents but .*config.data.channels=3"):
    _encode(_latent_config(channels=3), vae_dir, vae, tmp_path / "a", source_path=folder)
  with pytest.raises(ConfigError, match="pass --source=<pixel data name>"):
    _encode(_latent_config(), vae_dir, vae, tmp_path / "b", source="")
  with pytest.raises(ConfigError, match="--source=folder needs --source_path"):
    _encode(_latent_config(), vae_dir, vae, tmp_path / "c")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  np.save(foreign / "latents.npy", np.ones(3))
  with pytest.raises(ConfigError, match=r"holds \['latents.npy'\] but no latents.json"):
    _encode(_latent_config(), vae_dir, vae, foreign, source_path=folder)
  np.testing.assert_array_equal(np.load(foreign / "latents.npy"), np.ones(3))


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "dit_jax.tools.encode_latents", *args],
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.multiprocess
def test_cli_completes_and_refuses(full, tmp_path, vae_dir, folder):
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")
  common = [
    f"--config={config}",
    "--config.data.name=latents",
    "--config.data.image_size=4",
    "--config.data.channels=4",
    "--source=folder",
    f"--source_path={folder}",
    f"--out={full}",
    "--flip",
    "--std",
    f"--batch_size={_BATCH}",
    "--dtype=float32",
  ]
  done = _cli(*common, f"--vae={vae_dir}")
  assert done.returncode == 0, done.stderr
  assert "is complete: 7 latents" in done.stderr
  other = str(tmp_path / "vae2")
  shutil.copytree(vae_dir, other)
  refused = _cli(*common, f"--vae={other}")
  assert refused.returncode == 1
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: --out=") and "other arguments: vae=" in last, refused.stderr


def _bucket_reference(image, height, width):
  """The bucket crop, transcribed independently: halve while both sides are at least twice the
  target's, bicubic so the image just covers it, the central part."""
  while image.width >= 2 * width and image.height >= 2 * height:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  ratio = max(width / image.width, height / image.height)
  image = image.resize(
    (round(image.width * ratio), round(image.height * ratio)), resample=Image.BICUBIC
  )
  array = np.array(image)
  y, x = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
  return array[y : y + height, x : x + width]


def test_latents_in_buckets(full, tmp_path, vae_dir, vae, folder):
  """With config.data.buckets, encode_latents crops each image to the bucket nearest its aspect
  ratio and encodes it at that size; killed after each shard it resumes to the same bytes; the
  latents source trains in those buckets, and shows other readers the square bucket alone."""
  from dit_jax.data import records

  spec = "4x4,3x5,5x3"  # Latent cells; the tiny VAE's pixels are twice that.
  config = _latent_config(buckets=spec)
  args = dict(source_path=folder, flip=True, std=True, dtype="float32", shard_size=_BATCH)
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  meta = _encode(config, vae_dir, vae, whole, **args)
  assert meta.buckets == spec and meta.format == "array_record"
  for done in (1, 2):
    _encode(config, vae_dir, vae, killed, max_chunks=1, **args)
    assert len([n for n in os.listdir(killed) if n.startswith("buckets-")]) == done
  _encode(config, vae_dir, vae, killed, **args)
  for name in os.listdir(whole):
    assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
  assert any(n == records.shard_name("buckets", 0, 3) for n in os.listdir(whole))

  sizes = data.buckets.parse(spec)
  source = data.build_source(_latent_config(path=str(whole), buckets=spec), bucketed=True)
  bucket_of = source.bucket_of()
  i = 0
  for label, name in enumerate(sorted(_SIZES)):
    for j, (w, h) in enumerate(_SIZES[name]):
      logs = [abs(np.log(h / w) - np.log(bh / bw)) for bh, bw in sizes]
      bucket = int(np.argmin(logs))
      assert bucket_of[i] == bucket, (name, j)
      bh, bw = sizes[bucket]
      with Image.open(os.path.join(folder, name, f"{j}.png")) as image:
        pixels = _bucket_reference(image.convert("RGB"), 2 * bh, 2 * bw)
      pixels = pixels.astype(np.float32)[None] / 127.5 - 1.0
      padded = np.concatenate([pixels, np.zeros((_BATCH - 1, *pixels.shape[1:]), np.float32)])
      mean, std = vae.encode(padded)
      got = source.read(i, variants=True)
      assert got["image"].shape == (bh, bw, 4) and got["label"] == label
      np.testing.assert_allclose(got["image"], mean[0], atol=1e-5, err_msg=f"{name} {j}")
      np.testing.assert_allclose(got["latent_std"], std[0], atol=1e-5)
      flipped, _ = vae.encode(padded[:, :, ::-1])
      np.testing.assert_allclose(got["latent_flip"], flipped[0], atol=1e-5)
      i += 1
  assert len(set(bucket_of.tolist())) == 3  # The images fall in every bucket.

  # Training batches: each of one bucket, drawn from the posterior (std) of its elements.
  train = _latent_config(path=str(whole), buckets=spec, random_flip=True)
  it = data.build_train_iterator(train, batch_size=2)
  means = [source.read(k, variants=True) for k in range(7)]
  shapes = set()
  for _ in range(6):
    batch = next(it)["image"]
    shapes.add(batch.shape[1:3])
    for row in batch:
      assert not any(
        row.shape == m[key].shape and np.array_equal(row, m[key])
        for m in means
        for key in ("image", "latent_flip")
      )
  assert shapes <= set(sizes) and len(shapes) > 1

  # Outside training (validation, reference statistics): the square bucket's rows alone.
  square = data.build_source(_latent_config(path=str(whole), buckets=spec))
  want = [k for k in range(7) if bucket_of[k] == 0]
  assert len(square) == len(want)
  for k, row in enumerate(want):
    np.testing.assert_array_equal(square[k]["image"], source[row]["image"])

  with pytest.raises(data.DataError, match=r"encoded in the buckets '4x4,3x5,5x3', but .*set "):
    data.build_source(_latent_config(path=str(whole), buckets="4x4,5x3"), bucketed=True)
  with pytest.raises(data.DataError, match=r"holds latents of one size; encode the images"):
    data.build_source(_latent_config(path=str(full), buckets=spec), bucketed=True)
  with pytest.raises(ConfigError, match=r"cannot hold; use --format=array_record"):
    _encode(config, vae_dir, vae, tmp_path / "x", source_path=folder, format="npy")
  with pytest.raises(ConfigError, match=r"\('digits'\) cannot be read in buckets"):
    _encode(config, vae_dir, vae, tmp_path / "y", source="digits")
  with pytest.raises(ConfigError, match=r"none of them 2x2 .*config.data.image_size"):
    data.build_source(_latent_config(path=str(whole), buckets=spec, image_size=2))
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
