"""DiffiT's time-dependent self-attention (model.attention_conditioning="tmsa") on DiT blocks:
parameters and their logical axes, zero time projections = plain DiT, dependence on t through
attention alone, fsdp_tp on 8 devices = 1 device, a plain checkpoint as the start of a TMSA run,
and the configurations it refuses."""

import functools

import _cli
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_parallel import LAYOUTS, LOSS_RTOL, PARAM_ATOL, _one_step, config_for

from dit_jax import axes, checkpoint, experiment
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.models import build_model
from dit_jax.models.attention import dot_product_attention
from dit_jax.train import loop

T = jnp.array([0.0, 10.0, 500.0, 999.0])
LABELS = {"label": jnp.array([0, 1, 2, 3])}


def _config(attention_conditioning="tmsa", **model):
  c = base_config()
  c.model.variant = "tiny/4"
  c.data.image_size, c.data.channels = 8, 1
  c.model.attention_conditioning = attention_conditioning
  for k, v in model.items():
    c.model[k] = v
  return c


@functools.cache
def _model(attention_conditioning="tmsa", fields=()):
  """Jitted init() -> boxed parameters, and apply(params, t) on fixed images and labels, of the
  tiny DiT with these model fields (compiled once per test session)."""
  model = build_model(_config(attention_conditioning, **dict(fields)))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  init = jax.jit(lambda: model.init(jax.random.key(0), x, T, LABELS)["params"])
  apply = jax.jit(lambda params, t: model.apply({"params": params}, x, t, LABELS))
  return init, apply


def _perturbed(params, scale=0.05):
  """Every parameter (the zero-initialized ones too) given some weight, as training does."""
  flat = traverse_util.flatten_dict(params, sep="/")
  noise = {
    k: scale * jax.random.normal(jax.random.fold_in(jax.random.key(2), i), v.shape)
    for i, (k, v) in enumerate(sorted(flat.items()))
  }
  return traverse_util.unflatten_dict({k: v + noise[k] for k, v in flat.items()}, sep="/")


def _time_kernel(params):
  return params["blocks"]["attn"]["time_qv"]["kernel"]


def _set_time_kernel(params, value):
  params["blocks"]["attn"]["time_qv"]["kernel"] = value


def _without_time(params):
  blocks = dict(params["blocks"])
  blocks["attn"] = {k: v for k, v in blocks["attn"].items() if k != "time_qv"}
  return {**params, "blocks": blocks}


def test_time_projection_kernel_shape_axes_and_zero_init():
  init, apply = _model()
  boxed = init()
  kernel = _time_kernel(boxed)
  # [layers, D, 2 (q, v), heads, head dim]; D = embed shards over fsdp, heads over tensor.
  assert kernel.names == (axes.LAYERS, axes.EMBED, None, axes.HEADS, axes.KV)
  assert kernel.value.shape == (2, 64, 2, 2, 32)
  # No bias: the token projections hold q's and v's.
  assert set(boxed["blocks"]["attn"]["time_qv"]) == {"kernel"}
  np.testing.assert_array_equal(kernel.value, 0.0)
  params = nn.meta.unbox(boxed)
  assert apply(params, T).shape == (4, 8, 8, 1)
  # Every other parameter is the plain DiT's, drawn the same.
  plain = nn.meta.unbox(_model("none")[0]())
  jax.tree.map(np.testing.assert_array_equal, _without_time(params), plain)
  extra = sum(x.size for x in jax.tree.leaves(params)) - sum(x.size for x in jax.tree.leaves(plain))
  assert extra == 2 * 2 * 64 * 64  # depth x 2 D^2


@pytest.mark.parametrize(
  "fields",
  [
    (),
    (("remat", "full"), ("scan_unroll", 2), ("dtype", "bfloat16")),
    (("conditioning", "in_context"),),
  ],
  ids=["adaln_zero", "remat_unroll_bfloat16", "in_context"],
)
def test_zero_time_projections_equal_the_plain_dit(fields):
  init, apply = _model("tmsa", fields)
  params = _perturbed(nn.meta.unbox(init()))
  _set_time_kernel(params, jnp.zeros_like(_time_kernel(params)))
  ref = _model("none", fields)[1](_without_time(params), T)
  np.testing.assert_allclose(apply(params, T), ref, atol=1e-6, rtol=0)
  assert float(jnp.abs(ref).max()) > 1e-2  # Not trivially zero.
  # Nonzero time projections change the output.
  _set_time_kernel(params, jnp.full_like(_time_kernel(params), 0.05))
  assert float(jnp.abs(apply(params, T) - ref).max()) > 1e-3


def test_output_depends_on_t_through_attention_alone():
  init, apply = _model()
  params = _perturbed(nn.meta.unbox(init()))
  # adaLN shifts, scales and gates that ignore t + y (kernels zero, biases not): t can reach the
  # output only through the time projections of the attention.
  for mod in (params["blocks"]["modulation"], params["final"]["modulation"]):
    mod["kernel"] = jnp.zeros_like(mod["kernel"])
  t_other = jnp.array([999.0, 500.0, 10.0, 0.0])
  assert float(jnp.abs(apply(params, T) - apply(params, t_other)).max()) > 1e-3
  _set_time_kernel(params, jnp.zeros_like(_time_kernel(params)))
  np.testing.assert_array_equal(apply(params, T), apply(params, t_other))
  # From zero, as initialized, the time projections of every block get a gradient.
  grads = jax.grad(lambda p: jnp.sum(apply(p, T) ** 2))(params)
  assert bool(jnp.all(jnp.abs(_time_kernel(grads)).reshape(2, -1).max(axis=1) > 0))


def test_a_time_term_on_the_keys_would_change_nothing():
  """Why TMSA leaves out DiffiT's key projection of t: a per-sample vector added to every key
  shifts each query's logits by a constant, which the softmax cancels."""
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 16, 2, 32))
  key_time = jax.random.normal(jax.random.key(4), (2, 1, 2, 32))  # [B, 1, H, Dh]
  np.testing.assert_allclose(
    dot_product_attention(q, k + key_time, v, "xla"),
    dot_product_attention(q, k, v, "xla"),
    atol=1e-5,
  )


def _tmsa_config(*layout):
  c = config_for(*layout)
  c.model.attention_conditioning = "tmsa"
  # Ungated adaLN: with adaLN-Zero's zero gates no attention parameter gets a gradient in step 1.
  c.model.conditioning = "adaln"
  return c


@pytest.mark.sharding
def test_fsdp_tp_train_step_equals_one_device():
  config = _tmsa_config(*LAYOUTS["fsdp_tp"])
  spec = experiment.build(config).state_shardings.params["blocks"]["attn"]["time_qv"]["kernel"].spec
  assert tuple(spec) == (None, "fsdp", None, "tensor", None)  # (layers, embed, 2, heads, kv)
  ref_params, ref_loss = _one_step(_tmsa_config(), jax.devices()[:1])
  params, loss = _one_step(config, jax.devices())
  np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
  assert float(np.abs(params["blocks"]["attn"]["time_qv"]["kernel"]).max()) > 0  # It trained.
  # The key bias's gradient is zero up to rounding (the softmax cancels it, as above), and Adam's
  # first step divides it by its own size: its update is rounding noise, on any mesh.
  for tree in (params, ref_params):
    tree["blocks"]["attn"]["key"].pop("bias")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), params, ref_params)


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"name": "mmdit", "variant": "d2"}, r"config.model.attention_conditioning='tmsa'.*'mmdit'"),
    ({"attention_conditioning": "adaln"}, r"config.model.attention_conditioning='adaln'"),
  ],
)
def test_bad_attention_conditioning_is_a_clear_error(fields, match):
  config = _config(**fields)
  with pytest.raises(ConfigError, match=match) as err:
    build_model(config)
  assert "config.model.attention_conditioning" in str(err.value)


@pytest.mark.integration
def test_a_plain_checkpoint_starts_a_tmsa_run_as_the_same_network(trained_workdir, tmp_path):
  """train.init_from a plain DiT into a TMSA config: the checkpoint's arrays, and zero time
  projections, so the new network computes what the checkpoint's did; then it trains."""
  plain = _cli.tiny_config()
  tmsa = _cli.tiny_config(model__attention_conditioning="tmsa")
  ours, theirs = experiment.build(tmsa, training=False), experiment.build(plain, training=False)
  _, want, want_ema = checkpoint.restore_weights(trained_workdir, theirs.abstract_state.params)
  with pytest.raises(ConfigError, match="time_qv/kernel: missing from the checkpoint"):
    checkpoint.restore_weights(trained_workdir, ours.abstract_state.params, tmsa)
  init = ours.init_state().params
  _, params, ema = checkpoint.restore_weights(
    trained_workdir, ours.abstract_state.params, tmsa, init_params=init
  )
  for got, ref in ((params, want), (ema, want_ema)):
    flat = traverse_util.flatten_dict(jax.device_get(got), sep="/")
    assert not np.any(flat.pop("blocks/attn/time_qv/kernel"))
    ref = traverse_util.flatten_dict(jax.device_get(ref), sep="/")
    assert flat.keys() == ref.keys()
    jax.tree.map(np.testing.assert_array_equal, flat, ref)
  x = jax.random.normal(jax.random.key(5), (4, 16, 16, 1))
  with ours.context():
    got = ours.model.apply({"params": ema}, x, T, LABELS)
  with theirs.context():
    ref = theirs.model.apply({"params": want_ema}, x, T, LABELS)
  np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
  assert float(jnp.abs(ref).max()) > 1e-3
  tmsa.train.update(init_from=trained_workdir, num_steps=2)
  assert np.isfinite(loop.run(tmsa, str(tmp_path / "tmsa"))["loss"])
