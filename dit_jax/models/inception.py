"""The Inception network of FID, sFID and the Inception Score, in Flax, run over a mesh.

    inception = Inception.load("pt_inception-2015-12-05-6726825d.pth", mesh)
    feats = inception.features(images)  # uint8 [N, H, W, 3] of any size
    feats["pool"]     # [N, 2048]       pool3: FID, precision and recall
    feats["spatial"]  # [N, 17*17*7]    mixed_6/conv, first 7 channels: sFID
    feats["logits"]   # [N, 1008]       softmax/logits without the bias: Inception Score

This is the TensorFlow graph of 2015-12-05 (`classify_image_graph_def.pb`) that ADM's evaluator
(openai/guided-diffusion evaluations/evaluator.py) runs, laid out as its PyTorch ports
(pytorch-fid's FID Inception, torch-fidelity's `FeatureExtractorInceptionV3`) lay it out, with
their tensor names, so it reads their weights file. Where this graph differs from torchvision's
InceptionV3 it follows the graph: average pools that do not count the padding (Mixed_5*,
Mixed_6b-e, Mixed_7b), a max pool in Mixed_7c's pool branch, and the input resized to 299x299 with
TensorFlow 1's bilinear `resize_bilinear` (no half-pixel offset), which torch-fidelity reproduces
and pytorch-fid does not.

Which tensor ADM reads where: `pool_3:0` is the global average pool (torch-fidelity's "2048").
`mixed_6/conv:0` is the output (after batch norm and ReLU) of the first conv of the graph's seventh
mixed block: `mixed`, `mixed_1`, `mixed_2` are Mixed_5b-d, `mixed_3` is Mixed_6a, so `mixed_6` is
Mixed_6d and its `conv` is the 1x1 branch, `Mixed_6d.branch1x1` in the PyTorch ports (192 channels
at 17x17; torch-fidelity does not return it). ADM keeps channels 0-6 and flattens in NHWC order.
The Inception Score takes the softmax of pool3 times `softmax/logits/MatMul`'s weights, without the
bias (torch-fidelity's "logits_unbiased").

Every process passes the same global batch and gets the whole result back; the batch is split over
the mesh's data axes and the params (24M, float32) are replicated.
"""

import functools
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dit_jax import parallel, storage
from dit_jax.errors import ConfigError

Params = dict[str, Any]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
)
# What to pass where the weights are asked for (config.eval.inception_weights, fid --inception).
WEIGHTS_HELP = f"{WEIGHTS_NAME} (pytorch-fid's, from {WEIGHTS_URL}) or the .npz converted from it"
SIZE = 299  # The graph resizes every input to this.
SPATIAL_CHANNELS = 7  # ADM's sFID keeps this many channels of mixed_6/conv.
NUM_LOGITS = 1008
DTYPES = ("float32", "bfloat16")
_BN_EPS = 1e-3  # Every batch norm of the graph.
_SOURCE_KEY = "__source_sha256__"  # In a converted .npz: the hash of the .pth it came from.
_IGNORED_SUFFIX = ".num_batches_tracked"  # Torch bookkeeping in the .pth, no weight.


# --------------------------------------------------------------------------------------------
# The network.


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics, torch's `BatchNorm2d` in eval mode (eps 1e-3)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros_init(), (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones_init(), (c,), jnp.float32)
    mul = scale * jax.lax.rsqrt(var + _BN_EPS)
    return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


class ConvBN(nn.Module):
  """Conv without bias -> frozen batch norm -> ReLU (the ports' `BasicConv2d`)."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.stride,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="conv",
    )(x)
    return nn.relu(FrozenBatchNorm(self.dtype, name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool divides by the number of real pixels under the window.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b-d (35x35): 1x1, 5x5, double 3x3 and average-pool branches."""

  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(name, features, kernel=(1, 1), padding=(0, 0)):
      return ConvBN(features, kernel, padding=padding, dtype=self.dtype, name=name)

    b1 = conv("branch1x1", 64)(x)
    b5 = conv("branch5x5_2", 64, (5, 5), (2, 2))(conv("branch5x5_1", 48)(x))
    b3 = conv("branch3x3dbl_1", 64)(x)
    b3 = conv("branch3x3dbl_2", 96, (3, 3), (1, 1))(b3)
    b3 = conv("branch3x3dbl_3", 96, (3, 3), (1, 1))(b3)
    bp = conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = ConvBN(384, (3, 3), stride=2, dtype=self.dtype, name="branch3x3")(x)
    bd = ConvBN(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), stride=2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (17x17): factorized 7x7 branches. Returns (output, the 1x1 branch)."""

  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c7 = self.channels_7x7

    def conv(name, features, kernel=(1, 1)):
      padding = (kernel[0] // 2, kernel[1] // 2)
      return ConvBN(features, kernel, padding=padding, dtype=self.dtype, name=name)

    b1 = conv("branch1x1", 192)(x)
    b7 = conv("branch7x7_1", c7)(x)
    b7 = conv("branch7x7_2", c7, (1, 7))(b7)
    b7 = conv("branch7x7_3", 192, (7, 1))(b7)
    bd = conv("branch7x7dbl_1", c7)(x)
    bd = conv("branch7x7dbl_2", c7, (7, 1))(bd)
    bd = conv("branch7x7dbl_3", c7, (1, 7))(bd)
    bd = conv("branch7x7dbl_4", c7, (7, 1))(bd)
    bd = conv("branch7x7dbl_5", 192, (1, 7))(bd)
    bp = conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(name, features, kernel=(1, 1), stride=1):
      padding = (0, 0) if stride > 1 else (kernel[0] // 2, kernel[1] // 2)
      return ConvBN(features, kernel, stride, padding, dtype=self.dtype, name=name)

    b3 = conv("branch3x3_2", 320, (3, 3), 2)(conv("branch3x3_1", 192)(x))
    b7 = conv("branch7x7x3_1", 192)(x)
    b7 = conv("branch7x7x3_2", 192, (1, 7))(b7)
    b7 = conv("branch7x7x3_3", 192, (7, 1))(b7)
    b7 = conv("branch7x7x3_4", 192, (3, 3), 2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b-c (8x8): split 3x3 branches; Mixed_7c's pool branch max-pools (the graph does)."""

  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(name, features, kernel=(1, 1)):
      padding = (kernel[0] // 2, kernel[1] // 2)
      return ConvBN(features, kernel, padding=padding, dtype=self.dtype, name=name)

    b1 = conv("branch1x1", 320)(x)
    b3 = conv("branch3x3_1", 384)(x)
    b3 = [conv("branch3x3_2a", 384, (1, 3))(b3), conv("branch3x3_2b", 384, (3, 1))(b3)]
    bd = conv("branch3x3dbl_2", 384, (3, 3))(conv("branch3x3dbl_1", 448)(x))
    bd = [conv("branch3x3dbl_3a", 384, (1, 3))(bd), conv("branch3x3dbl_3b", 384, (3, 1))(bd)]
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class Logits(nn.Module):
  """The 1008-way classifier. Returns the logits without the bias, as ADM's Inception Score
  uses them; the bias is a param only so that the weights file round-trips."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,))
    return x @ kernel


class InceptionV3(nn.Module):
  """The FID Inception on preprocessed input: float [B, 299, 299, 3] in [-1, 1].

  Returns {"pool": [B, 2048], "spatial": [B, 17 * 17 * 7], "logits": [B, 1008]}, float32.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    d = self.dtype
    x = x.astype(d)
    x = ConvBN(32, (3, 3), stride=2, dtype=d, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
    x = ConvBN(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), dtype=d, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
    x = ConvBN(80, dtype=d, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
    x = InceptionA(32, d, name="Mixed_5b")(x)
    x = InceptionA(64, d, name="Mixed_5c")(x)
    x = InceptionA(64, d, name="Mixed_5d")(x)  # [B, 35, 35, 288]
    x = InceptionB(d, name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x, _ = InceptionC(128, d, name="Mixed_6b")(x)
    x, _ = InceptionC(160, d, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, d, name="Mixed_6d")(x)  # The graph's mixed_6.
    x, _ = InceptionC(192, d, name="Mixed_6e")(x)
    x = InceptionD(d, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = InceptionE(False, d, name="Mixed_7b")(x)
    x = InceptionE(True, d, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
    spatial = spatial.reshape(spatial.shape[0], -1)  # [B, 17 * 17 * 7], (h, w, c) order as ADM
    return {"pool": pool, "spatial": spatial, "logits": Logits(name="fc")(pool)}


# --------------------------------------------------------------------------------------------
# Input: uint8 pixels -> the graph's input.


def _tf1_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TF1 `resize_bilinear` (align_corners=False) sampling along one axis: output pixel i reads
  input position i * (n_in / n_out), with no half-pixel offset, clamped at the far edge."""
  src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo.astype(np.float32)


def resize_tf1(x: jax.Array, size: int = SIZE) -> jax.Array:
  """Bilinear resize of float NHWC images to [size, size] as TensorFlow 1.x's `resize_bilinear`
  with align_corners=False, the op inside the 2015 Inception graph (torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x`); same arithmetic, so float32 results agree to
  rounding."""
  _, h, w, _ = x.shape
  lo, hi, frac = _tf1_axis(w, size)
  left, right = jnp.take(x, lo, axis=2), jnp.take(x, hi, axis=2)
  x = left + (right - left) * frac[None, None, :, None]  # [N, h, size, C]
  lo, hi, frac = _tf1_axis(h, size)
  top, bottom = jnp.take(x, lo, axis=1), jnp.take(x, hi, axis=1)
  return top + (bottom - top) * frac[None, :, None, None]  # [N, size, size, C]


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1], as the graph does before its
  first conv: resize, then (x - 128) / 128."""
  x = resize_tf1(images.astype(jnp.float32))
  return (x - 128.0) / 128.0


# --------------------------------------------------------------------------------------------
# Weights: the PyTorch ports' state dict <-> Flax params.

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.cache
def _flat_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]
  return {p: leaf.shape for p, leaf in traverse_util.flatten_dict(shapes).items()}


def param_shapes() -> Params:
  """Abstract params (float32 ShapeDtypeStructs) of `InceptionV3`."""
  flat = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in _flat_shapes().items()}
  return traverse_util.unflatten_dict(flat)


def check_params(params: Params) -> None:
  """Raises a ConfigError unless `params` has exactly the names and shapes of `InceptionV3`."""
  got = traverse_util.flatten_dict(params)
  for p, shape in _flat_shapes().items():
    if p not in got or tuple(np.shape(got[p])) != shape:
      found = tuple(np.shape(got[p])) if p in got else "nothing"
      raise ConfigError(f"The Inception param {'/'.join(p)} must have shape {shape}; got {found}.")
  extra = sorted(got.keys() - _flat_shapes().keys())
  if extra:
    raise ConfigError(f"The Inception has no param {'/'.join(extra[0])}; remove it.")


def _torch_name(path: tuple[str, ...]) -> str:
  """("Mixed_5b", "branch1x1", "bn", "mean") -> "Mixed_5b.branch1x1.bn.running_mean"."""
  leaf = path[-1]
  if path[-2] == "bn":
    leaf = _BN_NAMES[leaf]
  elif leaf == "kernel":
    leaf = "weight"
  return ".".join((*path[:-1], leaf))


def _to_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  """Flax layout -> torch layout: conv [kh, kw, I, O] -> [O, I, kh, kw], linear [I, O] -> [O, I]."""
  if path[-1] != "kernel":
    return a
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T


def _from_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return a
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T


def state_dict(params: Params) -> dict[str, np.ndarray]:
  """The PyTorch ports' state dict (names and layouts of `pt_inception-2015-12-05-6726825d.pth`)
  of `params`, as float32 numpy arrays."""
  return {
    _torch_name(p): np.ascontiguousarray(_to_torch(p, np.asarray(a, np.float32)))
    for p, a in traverse_util.flatten_dict(params).items()
  }


def params_from_state_dict(tensors: dict[str, Any], source: str) -> Params:
  """Flax params from the ports' state dict; raises a ConfigError naming the first tensor that
  is missing, has the wrong shape or is not the FID Inception's. `source` names the file."""
  hint = f"it is not the FID Inception's state dict ({WEIGHTS_NAME}, from {WEIGHTS_URL})"
  unused = {k for k in tensors if not k.endswith(_IGNORED_SUFFIX)}
  params = {}
  for path, shape in _flat_shapes().items():
    name = _torch_name(path)
    if name not in tensors:
      raise ConfigError(f"{source!r} has no tensor {name!r}; {hint}.")
    unused.discard(name)
    a = np.asarray(tensors[name], np.float32)
    want = _to_torch(path, np.empty(shape, np.bool_)).shape
    if a.shape != want:
      raise ConfigError(
        f"{source!r}: tensor {name!r} has shape {a.shape}, the FID Inception's has {want}; {hint}."
      )
    params[path] = np.ascontiguousarray(_from_torch(path, a))
  if unused:
    raise ConfigError(
      f"{source!r} holds {len(unused)} tensors the FID Inception does not have (e.g. "
      f"{sorted(unused)[0]!r}); {hint}."
    )
  return traverse_util.unflatten_dict(params)


def random_params(seed: int = 0) -> Params:
  """Random params (float32 numpy) of the real architecture whose activations keep their scale
  through the network: He-normal conv kernels, batch-norm statistics drawn around the identity
  (each layer scales by 0.8-1.2 and shifts by about 0.05), a 1/sqrt(fan-in) classifier."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in sorted(_flat_shapes().items()):  # Sorted: the same seed, the same params.
    if path[-2] == "bn":
      if path[-1] == "bias":  # The first of the four in sorted order: draw them together.
        var = rng.uniform(0.5, 2.0, shape)
        mean = rng.normal(0.0, 0.1, shape)
        mul = rng.uniform(0.8, 1.2, shape)
        out[(*path[:-1], "var")], out[(*path[:-1], "mean")] = var, mean
        out[(*path[:-1], "scale")] = mul * np.sqrt(var + _BN_EPS)
        out[path] = mean * mul + rng.normal(0.0, 0.05, shape)
    elif path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 2.0 if len(shape) == 4 else 1.0  # A ReLU follows every conv.
      out[path] = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
    else:
      out[path] = rng.normal(0.0, 0.1, shape)  # The classifier's bias.
  return traverse_util.unflatten_dict({p: np.asarray(a, np.float32) for p, a in out.items()})


def random_weights(path: str, seed: int = 0) -> None:
  """Writes random weights of the real architecture (`random_params`) as a weights file that
  `Inception.load` reads: a PyTorch state dict like the standard file (needs torch), or, if
  `path` ends in .npz, the converted form (no torch). For tests and benchmarks."""
  tensors = state_dict(random_params(seed))
  if path.endswith(".npz"):
    storage.save_npz(path, **tensors)
    return
  try:
    import torch
  except ImportError:
    raise ConfigError(
      f"Writing {path!r} as a PyTorch file needs torch (pip install torch); give a path ending "
      "in .npz to write the converted form instead."
    ) from None
  sd = {k: torch.from_numpy(v) for k, v in tensors.items()}
  for name in [k for k in sd if k.endswith(".bn.running_var")]:  # As torch's BatchNorm2d saves.
    sd[name.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
  with storage.staged(path) as local:
    torch.save(sd, local)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    return storage.load_npz(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(
      f"{path!r} cannot be read as .npz weights ({e}); pass the FID Inception weights "
      f"({WEIGHTS_NAME}) or their converted .npz."
    ) from None


def _read_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ConfigError(
      f"Reading {path!r} needs PyTorch once, to convert it to {path + '.npz'!r} (pip install "
      "torch, or convert it on a machine with torch and copy the .npz next to it)."
    ) from None
  try:
    with storage.local_copy(path) as local:
      sd = torch.load(local, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types on a file that is not a checkpoint.
    raise ConfigError(
      f"{path!r} cannot be read as a PyTorch state dict ({type(e).__name__}); pass the FID "
      f"Inception weights {WEIGHTS_NAME} (from {WEIGHTS_URL})."
    ) from None
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise ConfigError(
      f"{path!r} holds a {type(sd).__name__}, not a state dict of tensors; pass the FID "
      f"Inception weights {WEIGHTS_NAME} (from {WEIGHTS_URL})."
    )
  return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def load_params(path: str) -> Params:
  """The params of a weights file: the standard PyTorch file (`pt_inception-2015-12-05-6726825d
  .pth`), converted once to `<path>.npz` next to it and read from there afterwards without torch,
  or such an .npz itself."""
  if not storage.isfile(path):
    raise ConfigError(
      f"The Inception weights {path!r} do not exist; download {WEIGHTS_URL} (the file pytorch-fid "
      "and torch-fidelity use) and pass its path as eval.inception_weights or --inception=."
    )
  if path.endswith(".npz"):
    tensors = _read_npz(path)
    tensors.pop(_SOURCE_KEY, None)
    return params_from_state_dict(tensors, path)
  cache, digest = path + ".npz", storage.sha256(path)
  if storage.isfile(cache):
    tensors = _read_npz(cache)
    if str(tensors.pop(_SOURCE_KEY, "")) == digest:
      return params_from_state_dict(tensors, cache)
    logging.info("%s was converted from another file; converting %s again.", cache, path)
  params = params_from_state_dict(_read_pth(path), path)  # Checked before anything is written.
  try:
    storage.save_npz(cache, **state_dict(params), **{_SOURCE_KEY: np.asarray(digest)})
    logging.info("Converted %s to %s; later loads read that without PyTorch.", path, cache)
  except OSError as e:
    logging.warning("Cannot write %s (%s); converting %s in memory each time.", cache, e, path)
  return params


# --------------------------------------------------------------------------------------------
# The network over a mesh.


def _global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a host array that every process holds whole."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def default_mesh() -> Mesh:
  from dit_jax import config_defaults

  return parallel.make_mesh(config_defaults.base_config())


class Inception:
  """The FID Inception with its params replicated on `mesh`, jitted once per batch shape.

  Attributes:
    mesh: the device mesh; the batch is split over its data axes (data x fsdp).
    dtype: compute dtype, "float32" (for reported numbers) or "bfloat16".
  """

  def __init__(self, params: Params, mesh: Mesh | None = None, dtype: str = "float32"):
    if dtype not in DTYPES:
      raise ConfigError(
        f"The Inception's dtype {dtype!r} is not supported; choose one of {DTYPES}."
      )
    check_params(params)
    self.mesh = default_mesh() if mesh is None else mesh
    self.dtype = dtype
    module = InceptionV3(jnp.dtype(dtype))
    replicated, batch = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
    self._params = jax.tree.map(lambda a: _global(np.asarray(a, np.float32), replicated), params)
    # Two programs: the resize compiles once per input size, the network once per batch size.
    self._preprocess = jax.jit(preprocess, in_shardings=batch, out_shardings=batch)
    # TPUs multiply float32 in one bfloat16 pass by default; reported numbers need float32.
    precision = "highest" if dtype == "float32" else "default"

    def network(params, x):
      with jax.default_matmul_precision(precision):
        return module.apply({"params": params}, x)

    self._network = jax.jit(network, in_shardings=(replicated, batch), out_shardings=batch)

  @classmethod
  def load(cls, path: str, mesh: Mesh | None = None, dtype: str = "float32") -> "Inception":
    """The network with the weights at `path` (see `load_params`); `mesh` defaults to all
    devices on the data axis."""
    return cls(load_params(path), mesh, dtype)

  def features_sharded(self, images: jax.Array) -> dict[str, jax.Array]:
    """`features` of a global uint8 array [B, H, W, 3] already split by
    `parallel.batch_sharding(mesh)` (B a multiple of the data-parallel size); sharded results."""
    return self._network(self._params, self._preprocess(images))

  def flops(self, batch_shape: tuple[int, ...]) -> float:
    """XLA's FLOP count (multiply-add = 2) of `features_sharded` on uint8 images of
    `batch_shape` [B, H, W, 3]: the resize to 299x299 and the network."""
    from dit_jax import utils

    images = jax.ShapeDtypeStruct(batch_shape, jnp.uint8)
    resized = jax.ShapeDtypeStruct((batch_shape[0], SIZE, SIZE, 3), jnp.float32)
    return utils.xla_flops(self._preprocess.lower(images).compile()) + utils.xla_flops(
      self._network.lower(self._params, resized).compile()
    )

  def features(
    self, images: np.ndarray, batch_size: int = 64, progress: bool = False
  ) -> dict[str, np.ndarray]:
    """Inception features of uint8 images [N, H, W, 3] of any size (grayscale [N, H, W, 1] is
    repeated to 3 channels), the same global array on every process.

    Args:
      images: uint8 pixels in [0, 255], NHWC.
      batch_size: images per step over the whole mesh, rounded up to a multiple of its
        data-parallel size; the last step is padded to the same shape, so one compile serves all.
      progress: show a progress bar (process 0).

    Returns:
      {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]} float32 numpy arrays.
    """
    images = _check_images(images)
    n = images.shape[0]
    dp = parallel.data_parallel_size(self.mesh)
    step = -(-min(max(batch_size, 1), max(n, 1)) // dp) * dp
    sharding = parallel.batch_sharding(self.mesh)
    chunks, pending = [], []
    starts = range(0, n, step)
    if progress and jax.process_index() == 0:
      from tqdm import tqdm

      starts = tqdm(starts, desc="Inception features", unit="batch")
    for start in starts:
      chunk = images[start : start + step]
      count = len(chunk)
      if count < step:
        chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), np.uint8)])
      pending.append((count, self.features_sharded(_global(chunk, sharding))))
      if len(pending) > 1:  # Fetch one step behind, so the device keeps working meanwhile.
        chunks.append(_fetch(*pending.pop(0)))
    chunks.extend(_fetch(*p) for p in pending)
    if not chunks:
      dims = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS, "logits": NUM_LOGITS}
      return {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _fetch(count: int, out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  out = multihost_utils.process_allgather(out, tiled=True)
  return {k: np.asarray(v, np.float32)[:count] for k, v in out.items()}


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  shape = images.shape
  if images.dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or 0 in shape[1:]:
    raise ConfigError(
      f"The Inception takes uint8 images [N, H, W, 3] (or grayscale [N, H, W, 1]) with pixels in "
      f"0-255; got {images.dtype} {shape}."
    )
  if shape[-1] == 1:
    logging.info("Repeating the channel of grayscale images %s to RGB for the Inception.", shape)
    images = np.repeat(images, 3, axis=-1)
  return images
