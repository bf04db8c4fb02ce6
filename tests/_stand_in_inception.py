"""A stand-in for the FID Inception in tests whose subject is the evaluation around the network
(when it scores, what it resumes, caches and logs), not the network: the same class and outputs,
a few milliseconds to compile instead of the real 299x299 InceptionV3.

`write(path)` saves its weights: a fixed random projection of 8x8 pixels to the real feature
widths (pool 2048, spatial 2023, logits 1008). `patch(monkeypatch)` makes `Inception.load` build
the stand-in from such a file and the real network from any other, so a config names the
stand-in exactly as it names real weights (config.eval.inception_weights), and caches keyed by
the weights' hash never mix the two. The real network is tested in tests/test_inception.py
(against torch-fidelity), tests/test_evaluate.py (sharded featurization) and the `fid` command
line (tests/test_fid.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import parallel
from dit_jax.models import inception

_SIZE = 8  # Inputs are resized to _SIZE x _SIZE.
_WIDTHS = (2048, 17 * 17 * inception.SPATIAL_CHANNELS, inception.NUM_LOGITS)
_MARK = "stand_in_inception"  # The key that tells a stand-in file from real weights.


def write(path: str, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  projection = rng.standard_normal((_SIZE * _SIZE * 3, sum(_WIDTHS)), np.float32) / 14.0
  np.savez(path, **{_MARK: projection})
  return path


class StandIn(inception.Inception):
  """`inception.Inception` with the projection as its network: `features`, `features_sharded`
  and `mesh` behave as the real one's (batch split over the mesh's data axes)."""

  def __init__(self, projection: np.ndarray, mesh=None):
    self.mesh = inception.default_mesh() if mesh is None else mesh
    self.dtype = "float32"
    replicated, batch = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
    self._params = jax.device_put(jnp.asarray(projection), replicated)

    def resize(images):
      x = jax.image.resize(
        images.astype(jnp.float32), (images.shape[0], _SIZE, _SIZE, 3), "bilinear"
      )
      return (x - 128.0) / 128.0

    def network(projection, x):
      out = jnp.tanh(x.reshape(x.shape[0], -1) @ projection)
      pool, spatial, logits = jnp.split(out, np.cumsum(_WIDTHS)[:-1], axis=1)
      return {"pool": pool + 1.0, "spatial": spatial, "logits": 4.0 * logits}

    self._preprocess = jax.jit(resize, in_shardings=batch, out_shardings=batch)
    self._network = jax.jit(network, in_shardings=(replicated, batch), out_shardings=batch)


def patch(monkeypatch) -> None:
  real = inception.Inception.load.__func__

  def load(cls, path, mesh=None, dtype="float32"):
    if str(path).endswith(".npz"):
      with np.load(path) as z:
        if _MARK in z.files:
          return StandIn(z[_MARK], mesh)
    return real(cls, path, mesh, dtype)

  monkeypatch.setattr(inception.Inception, "load", classmethod(load))
