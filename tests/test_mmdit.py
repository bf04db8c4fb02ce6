"""MMDiT: structure, adaLN-Zero init, text dependence, resolution change, per-encoder text dropout,
sharding presets, and parity with diffusers' SD3Transformer2DModel (PyTorch, CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import experiment, parallel
from dit_jax.conditioning import TextConditioner
from dit_jax.config_defaults import base_config
from dit_jax.data.text import EncoderSlot, TextSpec, single_encoder_spec
from dit_jax.errors import ConfigError
from dit_jax.models import build_model, convert


def _config(variant="d2", size=8, channels=4, text=(5, 12, 6), **model):
  c = base_config()
  c.model.name, c.model.variant = "mmdit", variant
  c.data.name, c.data.image_size, c.data.channels = "synthetic", size, channels
  c.model.context_len, c.model.context_dim, c.model.pooled_dim = text
  for k, v in model.items():
    c.model[k] = v
  return c


def _inputs(config, batch=3, seed=1):
  k = jax.random.split(jax.random.key(seed), 3)
  s, ch = config.data.image_size, config.data.channels
  x = jax.random.normal(k[0], (batch, s, s, ch))
  cond = {
    "context": jax.random.normal(k[1], (batch, config.model.context_len, config.model.context_dim)),
    "pooled": jax.random.normal(k[2], (batch, config.model.pooled_dim)),
  }
  return x, jnp.linspace(10.0, 990.0, batch), cond


def _model(config):
  spec = single_encoder_spec(
    config.model.context_len, config.model.context_dim, config.model.pooled_dim
  )
  return build_model(config, spec)


def _perturbed_params(config, seed=2):
  model = _model(config)
  # Jitted: an eager init dispatches every op of the scanned blocks one by one (~10x slower).
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *_inputs(config))["params"])
  noise = lambda p: p + 0.05 * jax.random.normal(jax.random.key(seed), p.shape)  # noqa: E731
  return model, params, jax.jit(lambda ps: jax.tree.map(noise, ps))(params)


def test_starts_as_zero_output_and_depends_on_text_after_perturbation():
  config = _config()
  model, params, perturbed = _perturbed_params(config)
  apply = jax.jit(model.apply)
  x, t, cond = _inputs(config)
  np.testing.assert_array_equal(apply({"params": params}, x, t, cond), 0.0)
  base = apply({"params": perturbed}, x, t, cond)
  for key in ("context", "pooled"):
    other = dict(cond, **{key: cond[key].at[1].multiply(-1.0)})
    out = apply({"params": perturbed}, x, t, other)
    np.testing.assert_allclose(out[0], base[0], atol=1e-6)  # Examples do not mix.
    assert float(jnp.abs(out[1] - base[1]).max()) > 1e-3, key
  # The last block has no text output projection or text MLP (as in SD3).
  assert "txt_out" not in params["last_block"]["attn"] and "txt_mlp" not in params["last_block"]
  assert params["blocks"]["img_mlp"]["fc1"]["kernel"].shape[0] == 1  # d2: 1 scanned + the last.


def test_qk_norm_is_switchable():
  def param_shapes(config):
    model = _model(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(config)))["params"]

  with_norm = param_shapes(_config(qk_norm=True))
  without = param_shapes(_config(qk_norm=False))
  assert "img_q_norm" in with_norm["blocks"]["attn"]
  assert "img_q_norm" not in without["blocks"]["attn"]


def test_position_table_crops_so_one_model_serves_two_resolutions():
  small = _config(size=8, pos_embed_max_size=8)
  large = _config(size=16, pos_embed_max_size=8)
  model, _, params = _perturbed_params(small)
  x, t, cond = _inputs(large)
  out = _model(large).apply({"params": params}, x, t, cond)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ConfigError, match="pos_embed_max_size"):
    _model(_config(size=32, pos_embed_max_size=8))


def test_parameter_count_of_the_2b_and_8b_variants():
  def count(variant):
    c = _config(variant, size=128, channels=16, text=(333, 4096, 2048), pos_embed_max_size=192)
    c.model.qk_norm = False
    model = _model(c)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(c, batch=1)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))

  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):  # SD3-medium's architecture, without allocating its weights.
    sd3_medium = diffusers.SD3Transformer2DModel(
      sample_size=128, num_layers=24, num_attention_heads=24, caption_projection_dim=1536
    )
  reference = sum(p.numel() for p in sd3_medium.parameters())  # The position table is a buffer.
  assert count("d24") == reference and 2.0e9 < reference < 2.1e9
  assert 7.9e9 < count("d38") < 8.3e9  # The paper's largest model, "8B".


def test_text_dropout_is_per_encoder_and_uses_the_empty_caption():
  rng = np.random.default_rng(0)
  spec = TextSpec(
    context_len=5,
    context_dim=6,
    pooled_dim=4,
    encoders=(
      EncoderSlot("clip", (0, 3), (0, 4), (0, 4)),
      EncoderSlot("t5", (3, 5), (0, 6), (0, 0)),
    ),
    null_context=rng.normal(size=(5, 6)).astype(np.float32),
    null_pooled=rng.normal(size=4).astype(np.float32),
  )
  b = 4000
  cond = {"context": jnp.full((b, 5, 6), 7.0), "pooled": jnp.full((b, 4), 7.0)}
  out = TextConditioner(spec, dropout=0.4).drop(cond, jax.random.key(0))
  ctx, pooled = np.asarray(out["context"]), np.asarray(out["pooled"])
  clip_dropped = ctx[:, 0, 0] != 7.0
  t5_dropped = ctx[:, 3, 0] != 7.0
  # Each part is all kept or all replaced by the empty caption's encoding, independently.
  np.testing.assert_array_equal(
    ctx[clip_dropped][:, :3, :4],
    np.broadcast_to(spec.null_context[:3, :4], (clip_dropped.sum(), 3, 4)),
  )
  np.testing.assert_array_equal(ctx[~clip_dropped][:, :3, :4], 7.0)
  np.testing.assert_array_equal(ctx[:, :3, 4:], 7.0)  # Channels no encoder wrote there stay.
  np.testing.assert_array_equal(
    ctx[t5_dropped][:, 3:], np.broadcast_to(spec.null_context[3:], (t5_dropped.sum(), 2, 6))
  )
  np.testing.assert_array_equal(
    pooled[clip_dropped], np.broadcast_to(spec.null_pooled, (clip_dropped.sum(), 4))
  )
  np.testing.assert_array_equal(pooled[~clip_dropped], 7.0)
  for dropped in (clip_dropped, t5_dropped):
    assert abs(dropped.mean() - 0.4) < 0.03
  assert abs((clip_dropped & t5_dropped).mean() - 0.16) < 0.03  # Independent.

  # To zeros instead: the same draws (same key), the dropped parts zero, the rest as it was.
  zeros = TextConditioner(spec, dropout=0.4, replace_with="zeros").drop(cond, jax.random.key(0))
  zctx, zpooled = np.asarray(zeros["context"]), np.asarray(zeros["pooled"])
  np.testing.assert_array_equal(zctx[:, 0, 0] == 0, clip_dropped)
  np.testing.assert_array_equal(zctx[:, 3, 0] == 0, t5_dropped)
  np.testing.assert_array_equal(zctx[clip_dropped][:, :3, :4], 0.0)
  np.testing.assert_array_equal(zctx[t5_dropped][:, 3:], 0.0)
  np.testing.assert_array_equal(zpooled[clip_dropped], 0.0)
  np.testing.assert_array_equal(zctx[~clip_dropped][:, :3], 7.0)


@pytest.mark.integration
@pytest.mark.sharding
def test_fsdp_tp_shards_mmdit_and_matches_one_device(preset="fsdp_tp", mesh=(2, 2, 2)):
  def step(config, devices):
    exp = experiment.build(config, devices=devices)
    state = exp.init_state()
    rng = np.random.default_rng(0)
    batch = {
      k: rng.standard_normal(s.shape).astype(np.float32) for k, s in exp.abstract_batch().items()
    }
    with exp.context():
      state, metrics = exp.jit_train_step()(state, parallel.global_batch(batch, exp.mesh))
    return exp, jax.device_get(state.params), float(metrics["loss"])

  def config(preset="dp", mesh=(-1, 1, 1)):
    c = _config(text=(4, 16, 8))
    c.train.batch_size, c.train.lr, c.train.warmup_steps = 8, 1e-3, 0
    c.parallel.preset = preset
    c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = mesh
    return c

  _, ref_params, ref_loss = step(config(), jax.devices()[:1])
  exp, params, loss = step(config(preset, mesh), jax.devices())
  for path, s in jax.tree.leaves_with_path(exp.state_shardings.params):
    name = jax.tree_util.keystr(path)
    if "kernel" in name and "block" in name:
      assert "fsdp" in jax.tree.leaves(tuple(s.spec)), (name, s.spec)
      if preset == "fsdp_tp" and ("query" in name or "fc1" in name):
        assert "tensor" in jax.tree.leaves(tuple(s.spec)), (name, s.spec)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


# --- Parity with diffusers (PyTorch on CPU) ---------------------------------------------------


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_converted_diffusers_sd3_transformer_gives_the_same_output(tmp_path, qk_norm):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  hf = diffusers.SD3Transformer2DModel(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=12,
    qk_norm=qk_norm,
  ).eval()
  with torch.no_grad():  # Random weights everywhere, so that no zero init hides a mistake.
    for name, p in hf.named_parameters():
      if p.ndim >= 2:  # Unit-variance activations, as in a trained model.
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
      else:  # Biases, and the RMS-norm scales around 1.
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
  hf.save_pretrained(tmp_path)

  params, overrides = convert.load_sd3(str(tmp_path))
  config = base_config()
  convert.apply_overrides(config, overrides)
  config.data.image_size = 12  # Not the checkpoint's sample_size: the position table is cropped.
  spec = single_encoder_spec(7, 24, 16)
  model = build_model(config, spec)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12, 12, 4)).astype(np.float32)
  context = rng.standard_normal((2, 7, 24)).astype(np.float32)
  pooled = rng.standard_normal((2, 16)).astype(np.float32)
  t = np.array([250.0, 875.0], np.float32)  # Model time = 1000 x the flow time, as in SD3.
  with torch.no_grad():
    want = (
      hf(
        hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2)),
        encoder_hidden_states=torch.from_numpy(context),
        pooled_projections=torch.from_numpy(pooled),
        timestep=torch.from_numpy(t),
      )
      .sample.numpy()
      .transpose(0, 2, 3, 1)
    )
  got = model.apply({"params": params}, x, t, {"context": context, "pooled": pooled})
  # float32 on both sides (measured: max difference ~6e-6 on outputs of magnitude up to ~5).
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-5, rtol=1e-5)
  assert np.abs(want).max() > 1.0


def test_converter_rejects_what_it_cannot_represent():
  with pytest.raises(ConfigError, match="dual_attention_layers"):
    convert.sd3_overrides({"dual_attention_layers": [0, 1]})
  with pytest.raises(ConfigError, match="not a diffusers SD3"):
    convert.load_sd3("/nonexistent")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_sampler_matches_diffusers_flow_match_euler_scheduler(shift):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from dit_jax.diffusion import build_diffusion
  from dit_jax.diffusion.samplers import time_grid

  c = base_config()
  c.diffusion.objective, c.diffusion.shift = "rectified_flow", shift
  diff = build_diffusion(c)

  def velocity(z, model_time):  # Any smooth function of (z, t) stands in for the network.
    return 0.5 * z + jnp.sin(model_time / 300.0)[:, None, None, None]

  noise = np.random.default_rng(0).standard_normal((2, 3, 3, 1)).astype(np.float32)
  for steps in (1, 5, 28):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    grid = time_grid(diff.schedule, steps, diff.shift)
    np.testing.assert_allclose(grid, scheduler.sigmas.numpy()[:-1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
      diff.schedule.model_time(grid), scheduler.timesteps.numpy(), rtol=1e-6, atol=1e-4
    )
    z = torch.from_numpy(noise)
    for t in scheduler.timesteps:
      v = velocity(jnp.asarray(z.numpy()), jnp.full((2,), float(t)))
      z = scheduler.step(torch.from_numpy(np.array(v)), t, z).prev_sample
    ours = diff.sample(velocity, jnp.asarray(noise), sampler="euler", num_steps=steps, rng=None)
    np.testing.assert_allclose(np.asarray(ours), z.numpy(), rtol=1e-5, atol=1e-5)
