"""The FID Inception: parity with torch-fidelity's network (resize included) on random weights,
TF1's bilinear resize, and the weights file's conversion and errors."""

import importlib
import importlib.util
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from dit_jax import config_defaults, parallel
from dit_jax.errors import ConfigError
from dit_jax.models import inception
from dit_jax.models.inception import Inception


def _torch_fidelity(module: str) -> types.ModuleType:
  """A module of torch-fidelity without running the package's __init__, which imports
  torchvision (whose wheels do not load with the CPU torch pinned here); its own modules need
  only torch."""
  pytest.importorskip("torch")
  spec = importlib.util.find_spec("torch_fidelity")  # Finds the package without importing it.
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
  saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
  for k in saved:
    del sys.modules[k]
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = package
  try:
    return importlib.import_module(f"torch_fidelity.{module}")
  finally:  # The loaded module keeps its imports; the stand-in package leaves sys.modules.
    for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
      del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
  """Random weights of the real architecture, as the standard PyTorch file."""
  pytest.importorskip("torch")
  path = str(tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME)
  inception.random_weights(path, seed=0)
  return path


@pytest.fixture(scope="module")
def net(weights) -> Inception:
  mesh = parallel.make_mesh(config_defaults.base_config(), jax.devices()[:2])
  return Inception.load(weights, mesh)


def _images() -> list[np.ndarray]:
  """Two uint8 images of different sizes: noise, and gray blobs (the resize test covers more)."""
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (32, 32, 3), np.uint8)
  blobs = np.kron(rng.integers(0, 256, (8, 6, 1)), np.ones((8, 8, 3))).astype(np.uint8)
  return [noise, blobs]  # 32x32, 64x48 (gray)


@pytest.fixture
def torch_one_thread():
  """PyTorch on one thread: on a busy machine its threads wait on each other for seconds."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


def test_features_match_torch_fidelity(weights, net, torch_one_thread):
  torch = torch_one_thread
  tf = _torch_fidelity("feature_extractor_inceptionv3")
  reference = tf.FeatureExtractorInceptionV3(
    "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
  )
  taps = []  # ADM's mixed_6/conv:0 is Mixed_6d.branch1x1's output, which torch-fidelity skips.
  reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: taps.append(out))
  ours = {k: [] for k in ("pool", "spatial", "logits")}
  theirs = {k: [] for k in ours}
  for i, image in enumerate(_images()):
    # The gray image goes to the Flax side as [1, H, W, 1], which it repeats to RGB.
    feats = net.features(image[None, ..., :1] if i == 1 else image[None])
    for k in ours:
      ours[k].append(feats[k][0])
    with torch.no_grad():
      pool, logits = reference(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous())
    spatial = taps.pop()[:, : inception.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(1, -1)
    for k, v in (("pool", pool), ("spatial", spatial), ("logits", logits)):
      theirs[k].append(v[0].numpy())
  for k in ours:
    a, b = np.stack(ours[k]), np.stack(theirs[k])
    assert a.shape == b.shape == (2, {"pool": 2048, "spatial": 2023, "logits": 1008}[k])
    assert a.dtype == np.float32
    scale = np.abs(b).max()
    err = np.abs(a - b).max()
    assert err <= 1e-4 * scale, (k, err, scale)
    # Random weights still tell images apart: no collapse to one feature vector.
    assert np.std(b, axis=0).mean() > 0.02 * np.abs(b).mean(), k


def test_chunks_and_padding_leave_features_unchanged(net):
  noise = _images()[0]
  batch = np.stack([noise, noise[::-1], noise])
  # Steps of 2 images (1 rounds up to the 2 devices): the third image rides in a padded step.
  chunked = net.features(batch, batch_size=1)
  alone = net.features(noise[None])
  for k, v in chunked.items():
    assert v.shape[0] == 3
    np.testing.assert_allclose(v[[0, 2]], alone[k].repeat(2, axis=0), rtol=1e-6, atol=1e-6)
    assert np.abs(v[1] - v[0]).max() > 1e-3  # The flipped image differs.


def test_resize_matches_tensorflow1(torch_one_thread):
  torch = torch_one_thread
  tf = _torch_fidelity("interpolate_compat_tensorflow")
  rng = np.random.default_rng(1)
  for h, w in ((7, 5), (299, 299), (512, 320)):
    x = (rng.random((2, h, w, 3)) * 255).astype(np.float32)
    ours = np.asarray(jax.jit(inception.resize_tf1)(x))
    theirs = tf.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
    )
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    if (h, w) == (299, 299):
      np.testing.assert_array_equal(ours, x)
  # No half-pixel offset: output pixel i reads input position i * in / out.
  x = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1).repeat(2, axis=1)
  np.testing.assert_allclose(
    np.asarray(inception.resize_tf1(x, 8))[0, 0, :, 0], [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
  )


def test_converted_weights_load_without_torch(weights, net, tmp_path, monkeypatch):
  cache = weights + ".npz"
  assert os.path.isfile(cache)  # Written by the first load.
  pth = tmp_path / "copy.pth"
  shutil.copy(weights, pth)
  shutil.copy(cache, str(pth) + ".npz")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails.
  params = inception.load_params(str(pth))
  want = jax.tree.map(np.asarray, net._params)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  params = inception.load_params(cache)  # The .npz given directly.
  jax.tree.map(np.testing.assert_array_equal, params, want)
  # A cache converted from another file is not used: without torch that is an error.
  other = tmp_path / "other.pth"
  other.write_bytes(pth.read_bytes() + b"\0")
  shutil.copy(cache, str(other) + ".npz")
  with pytest.raises(ConfigError, match="needs PyTorch once"):
    inception.load_params(str(other))


def test_random_weights_npz_form(net, tmp_path):
  path = str(tmp_path / "random.npz")
  inception.random_weights(path, seed=0)  # The seed of the .pth that `net` loaded.
  jax.tree.map(np.testing.assert_array_equal, inception.load_params(path), net._params)


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(ConfigError) as e:
    Inception.load(str(tmp_path / inception.WEIGHTS_NAME))
  for fragment in (inception.WEIGHTS_URL, "eval.inception_weights", "--inception="):
    assert fragment in str(e.value)


def test_wrong_files_name_the_problem(tmp_path):
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), inception.param_shapes())
  tensors = inception.state_dict(zeros)
  bad = dict(tensors, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ConfigError, match=r"'f.pth': tensor 'fc.weight' has shape \(1000, 2048\)"):
    inception.params_from_state_dict(bad, "f.pth")
  missing = {k: v for k, v in tensors.items() if k != "Mixed_6d.branch1x1.bn.running_var"}
  with pytest.raises(ConfigError, match="no tensor 'Mixed_6d.branch1x1.bn.running_var'"):
    inception.params_from_state_dict(missing, "f.pth")
  extra = dict(tensors, **{"AuxLogits.fc.weight": np.ones(2), "fc.num_batches_tracked": 0})
  with pytest.raises(ConfigError, match="1 tensors .* 'AuxLogits.fc.weight'"):
    inception.params_from_state_dict(extra, "f.pth")
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  if importlib.util.find_spec("torch"):
    with pytest.raises(ConfigError, match="cannot be read as a PyTorch state dict"):
      inception.load_params(str(text))
    assert not os.path.exists(str(text) + ".npz")  # Nothing is written for a bad file.
  (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(ConfigError, match="cannot be read as .npz"):
    inception.load_params(str(tmp_path / "broken.npz"))


def test_bad_images_are_refused(net):
  for images in (
    np.zeros((2, 32, 32, 3), np.float32),
    np.zeros((32, 32, 3), np.uint8),
    np.zeros((2, 32, 32, 4), np.uint8),
    np.zeros((2, 0, 32, 3), np.uint8),
  ):
    with pytest.raises(ConfigError, match=r"uint8 images \[N, H, W, 3\]"):
      net.features(images)
  empty = net.features(np.zeros((0, 8, 8, 3), np.uint8))
  assert {k: v.shape for k, v in empty.items()} == {
    "pool": (0, 2048),
    "spatial": (0, 2023),
    "logits": (0, 1008),
  }
