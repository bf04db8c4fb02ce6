"""The attention kernels (`config.model.attention`): the same numerics as the XLA formulation, and
clear errors where a kernel's platform is missing. The TPU kernel runs here in Pallas interpret
mode and is compiled for a TPU slice where libtpu is installed."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dit_jax import aot, experiment, models, parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.models.attention import check_platform, dot_product_attention

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _qkv(b, lq, lk, h, dh, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, lq, h, dh))
  k, v = (jax.random.normal(key, (b, lk, h, dh)) for key in keys[1:])
  return q, k, v


def _reference(q, k, v):
  """softmax(q k^T / sqrt(Dh)) v per head, in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_xla_is_softmax_attention():
  q, k, v = _qkv(2, 5, 7, 3, 8)
  out = dot_product_attention(q, k, v, "xla")
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _reference(q, k, v), atol=1e-5)


def _loss(implementation, **kw):
  return lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, implementation, **kw)))


# Token counts that are not multiples of the kernel's 128-token tiles: the kernel pads them.
@pytest.mark.parametrize("lq, lk", [(200, 200), (130, 3)])
def test_splash_matches_xla_in_interpret_mode(lq, lk):
  q, k, v = _qkv(2, lq, lk, 2, 32)
  got = dot_product_attention(q, k, v, "splash", interpret=True)
  np.testing.assert_allclose(got, dot_product_attention(q, k, v, "xla"), atol=2e-5)
  grads = jax.grad(_loss("splash", interpret=True), (0, 1, 2))(q, k, v)
  want = jax.grad(_loss("xla"), (0, 1, 2))(q, k, v)
  for g, w in zip(grads, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.sharding
def test_splash_splits_batch_and_heads_over_the_mesh():
  c = base_config()
  c.parallel.preset = "fsdp_tp"
  c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = 2, 2, 2
  mesh = parallel.make_mesh(c)
  rules = parallel.axis_rules(c)
  q, k, v = _qkv(4, 140, 140, 2, 16, seed=1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = nn.logical_to_mesh_axes(("batch", "seq", "heads", "kv"))
    assert spec == PartitionSpec(("data", "fsdp"), None, "tensor", None)
    q, k, v = jax.device_put((q, k, v), NamedSharding(mesh, spec))
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "splash", interpret=True))(q, k, v)
    grads = jax.jit(jax.grad(_loss("splash", interpret=True), (0, 1, 2)))(q, k, v)
  assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim)
  np.testing.assert_allclose(got, _reference(q, k, v), atol=2e-5)
  for g, w in zip(grads, jax.grad(_loss("xla"), (0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def _tiny(attention: str):
  c = base_config()
  c.model.variant, c.data.image_size = "tiny/4", 16
  c.train.batch_size = 8
  c.model.attention = attention
  return c


def test_unknown_attention_names_the_choices():
  with pytest.raises(ConfigError, match=r"model.attention='flash'.*\['xla', 'cudnn', 'splash'\]"):
    models.build_model(_tiny("flash"))


@pytest.mark.parametrize("attention, platform", [("cudnn", "GPU"), ("splash", "TPU")])
def test_a_kernel_on_the_wrong_platform_is_a_clear_error(attention, platform):
  with pytest.raises(ConfigError, match=f"needs {platform} devices.*CPU.*model.attention=xla"):
    experiment.build(_tiny(attention))
  check_platform(attention, platform.lower())


def _small_for_tpu(c):
  """TPU tiles pad dimensions to 128 lanes: keep every width a multiple of 128."""
  c.model.width, c.model.depth, c.model.heads = 256, 2, 2
  c.model.dtype = "bfloat16"
  c.parallel.preset = "fsdp"
  c.parallel.mesh.data, c.parallel.mesh.fsdp = 1, -1
  return c


@pytest.mark.integration  # Compiles for a TPU slice.
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_splash_train_step_compiles_for_a_tpu_slice(name):
  c = _small_for_tpu(base_config())
  if name == "dit":
    c.model.variant, c.data.image_size, c.data.channels = "mini/2", 16, 4  # 64 tokens
  else:
    c.model.name, c.model.variant = "mmdit", "d2"
    c.data.name, c.data.image_size, c.data.channels = "synthetic", 16, 16  # 64 + 10 tokens
    c.model.context_len, c.model.context_dim, c.model.pooled_dim = 10, 128, 128
  c.train.batch_size = 8
  c.model.attention = "splash"
  gen, shape = aot.parse_topology("v5e-4")
  exp = aot.build(c, aot.topology_devices(gen, shape))
  compiled = aot.compile_train_step(exp)
  assert "tpu_custom_call" in compiled.as_text()  # The Pallas kernel, not XLA's attention.
  assert aot.report(compiled, gen.hbm_bytes).fits
