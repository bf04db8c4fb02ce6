"""DiT: parameter counts of the paper's sizes, adaLN-Zero identity init, conditioning designs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.conditioning import LabelConditioner
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.experiment.step import dummy_inputs
from dit_jax.models import VARIANTS, build_model, layers


def _config(variant="tiny/2", size=16, channels=1, **model):
  c = base_config()
  c.model.variant = variant
  c.data.image_size, c.data.channels = size, channels
  for k, v in model.items():
    c.model[k] = v
  if c.model.learn_sigma:
    c.diffusion.objective = "eps"
  return c


def _param_count(config) -> int:
  model = build_model(config)
  cond = LabelConditioner(config.model.num_classes, 0.1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model, cond)))
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def _reference_count(width, depth, patch, channels=4, size=32, classes=1000):
  """The official implementation's count (its fixed position embedding is a registered
  parameter, so it is included), written out layer by layer from the paper's architecture."""
  d, out = width, 2 * channels
  tokens = (size // patch) ** 2
  block = (
    (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
  )
  embed = (patch * patch * channels * d + d) + (256 * d + d) + (d * d + d) + (classes + 1) * d
  final = (d * 2 * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
  return embed + depth * block + final + tokens * d


@pytest.mark.parametrize(
  "variant,approx", [("S/2", 33.0e6), ("B/2", 130.5e6), ("L/2", 458.1e6), ("XL/2", 675.1e6)]
)
def test_parameter_counts_match_the_paper(variant, approx):
  config = _config(variant, 32, 4, learn_sigma=True, num_classes=1000)
  dims = VARIANTS[variant]
  pos_embed = (32 // dims["patch"]) ** 2 * dims["width"]  # Fixed here, a buffer-parameter there.
  count = _param_count(config) + pos_embed
  assert count == _reference_count(dims["width"], dims["depth"], dims["patch"])
  assert abs(count - approx) < 0.05e6, count
  if variant == "XL/2":
    assert count == 675_129_632  # The figure the official training script prints.


def test_all_twelve_paper_variants_build():
  names = [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
  for v in names:
    dims = VARIANTS[v]
    count = _param_count(_config(v, 32, 4, learn_sigma=True, num_classes=1000))
    pos_embed = (32 // dims["patch"]) ** 2 * dims["width"]
    assert count + pos_embed == _reference_count(dims["width"], dims["depth"], dims["patch"]), v


def _labels(*labels):
  return {"label": jnp.array(labels)}


def _init_and_apply(config, x=None, params=None):
  model = build_model(config)
  shape = (4, config.data.image_size, config.data.image_size, config.data.channels)
  x = jax.random.normal(jax.random.key(1), shape) if x is None else x
  t = jnp.array([0.0, 10.0, 500.0, 999.0])
  y = _labels(0, 1, 2, 3)
  if params is None:
    params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y)["params"])
  return params, model.apply({"params": params}, x, t, y)


def test_adaln_zero_starts_as_zero_output_with_learned_sigma_channels():
  params, out = _init_and_apply(_config(learn_sigma=True))
  assert out.shape == (4, 16, 16, 2)
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialized final layer and gates.
  assert float(jnp.abs(params["blocks"]["modulation"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("conditioning", ["adaln", "cross_attention", "in_context"])
def test_other_conditioning_designs(conditioning):
  params, out = _init_and_apply(_config(conditioning=conditioning))
  assert out.shape == (4, 16, 16, 1) and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out).max()) > 0  # No zero init: the output depends on the input.
  assert ("cross_attn" in params["blocks"]) == (conditioning == "cross_attention")


def test_output_depends_on_label_and_time_after_training_perturbation():
  config = _config()
  params, _ = _init_and_apply(config)
  # Give the zero-initialized layers some weight, as training does.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  model = build_model(config)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  base = model.apply({"params": params}, x, jnp.array([5.0, 5.0]), _labels(1, 1))
  other_y = model.apply({"params": params}, x, jnp.array([5.0, 5.0]), _labels(1, 2))
  other_t = model.apply({"params": params}, x, jnp.array([5.0, 900.0]), _labels(1, 1))
  np.testing.assert_allclose(base[0], other_y[0], atol=1e-6)
  assert float(jnp.abs(base[1] - other_y[1]).max()) > 1e-3
  assert float(jnp.abs(base[1] - other_t[1]).max()) > 1e-3


def test_label_dropout_uses_the_null_class():
  cond = LabelConditioner(num_classes=10, dropout=0.3)
  labels = {"label": jnp.arange(4000) % 10}
  dropped = cond.drop(labels, jax.random.key(0))["label"]
  is_null = np.asarray(dropped == 10)
  np.testing.assert_array_equal(
    np.asarray(dropped)[~is_null], np.asarray(labels["label"])[~is_null]
  )
  assert abs(is_null.mean() - 0.3) < 0.03, is_null.mean()
  np.testing.assert_array_equal(cond.null(labels)["label"], 10)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  c32, c16 = _config(conditioning="adaln"), _config(conditioning="adaln", dtype="bfloat16")
  params, out32 = _init_and_apply(c32)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  _, out16 = _init_and_apply(c16, params=params)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))


def test_remat_changes_nothing_numerically():
  config = _config(conditioning="adaln")
  params, _ = _init_and_apply(config)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))

  def loss(p, remat):
    m = build_model(_config(conditioning="adaln", remat=remat))
    return jnp.sum(m.apply({"params": p}, x, jnp.array([1.0, 2.0]), _labels(0, 1)) ** 2)

  g_none = jax.grad(loss)(params, "none")
  g_full = jax.grad(loss)(params, "full")
  for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_full), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_position_embedding_layout():
  pos = layers.sincos_2d(8, 2, 3)  # [6 tokens, 8]
  assert pos.shape == (6, 8)
  # Row-major tokens: the first half encodes the column, the second half the row.
  np.testing.assert_allclose(pos[1, :4], layers.sincos_1d(4, np.array([1]))[0])
  np.testing.assert_allclose(pos[3, 4:], layers.sincos_1d(4, np.array([1]))[0])


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("variant", "XXL/2", "model.variant"),
    ("conditioning", "film", "model.conditioning"),
    ("name", "unet", "model.name"),
    ("dtype", "float8", "model.dtype"),
  ],
)
def test_bad_model_config_names_the_field(field, value, match):
  config = _config()
  config.model[field] = value
  with pytest.raises(ConfigError, match=match):
    build_model(config)


def test_patch_must_divide_image_size():
  with pytest.raises(ConfigError, match="image_size"):
    build_model(_config("tiny/8", size=12))
