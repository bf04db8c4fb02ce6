"""Importing released weights: the facebookresearch/DiT layout converted and compared with
diffusers' DiTTransformer2DModel, weights-only checkpoints restored onto any mesh, the errors of
bad imports, fine-tuning with train.init_from, and the official fused-qkv initialization."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from dit_jax import checkpoint, experiment
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import runner
from dit_jax.models import build_model, convert, layers
from dit_jax.tools import import_dit
from dit_jax.train import loop

torch = pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, DEPTH, HEADS, PATCH, SIZE, CHANNELS, CLASSES = 64, 2, 2, 2, 16, 4, 10


def tiny_config(variant="tiny/2"):
  """A DiT of the released kind (learned sigma, eps, class labels) at test size."""
  c = base_config()
  c.model.variant, c.model.learn_sigma, c.model.num_classes = variant, True, CLASSES
  c.diffusion.objective = "eps"
  c.data.name, c.data.image_size, c.data.channels = "synthetic", SIZE, CHANNELS
  c.train.batch_size, c.train.num_steps, c.train.log_every = 8, 2, 1
  c.train.lr, c.train.ema_decay = 1e-3, 0.5
  c.sample.num_images = c.sample.batch_size = 8
  c.sample.num_steps = 2
  return c


def official_state_dict(width=WIDTH, depth=DEPTH, patch=PATCH, classes=CLASSES, out=2 * CHANNELS):
  """Random weights under the names and shapes of facebookresearch/DiT's models.py (timm's
  Attention with a fused qkv Linear, timm's Mlp, a Conv2d patch embedding), nothing zero."""
  rng = np.random.default_rng(0)

  def linear(name, n_out, n_in, scale=1.0):
    return {
      f"{name}.weight": (scale * rng.standard_normal((n_out, n_in)) / n_in**0.5).astype(np.float32),
      f"{name}.bias": (0.2 * rng.standard_normal(n_out)).astype(np.float32),
    }

  d, c = width, CHANNELS
  sd = {
    "x_embedder.proj.weight": (rng.standard_normal((d, c, patch, patch)) / 4).astype(np.float32),
    "x_embedder.proj.bias": (0.2 * rng.standard_normal(d)).astype(np.float32),
    "y_embedder.embedding_table.weight": rng.standard_normal((classes + 1, d)).astype(np.float32),
    **linear("t_embedder.mlp.0", d, 256),
    **linear("t_embedder.mlp.2", d, d),
    **linear("final_layer.adaLN_modulation.1", 2 * d, d),
    **linear("final_layer.linear", patch * patch * out, d),
  }
  for i in range(depth):
    sd |= linear(f"blocks.{i}.attn.qkv", 3 * d, d)
    sd |= linear(f"blocks.{i}.attn.proj", d, d)
    sd |= linear(f"blocks.{i}.mlp.fc1", 4 * d, d)
    sd |= linear(f"blocks.{i}.mlp.fc2", d, 4 * d)
    sd |= linear(f"blocks.{i}.adaLN_modulation.1", 6 * d, d, scale=0.5)
  # The fixed sin-cos table, as the official code computes it (column features first).
  grid = SIZE // patch
  cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))
  omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))

  def sincos(pos):
    angles = pos.reshape(-1, 1) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  sd["pos_embed"] = np.concatenate([sincos(cols), sincos(rows)], 1)[None].astype(np.float32)
  return sd


def diffusers_dit(sd):
  """diffusers' DiTTransformer2DModel holding the weights of the official state dict `sd`.

  diffusers copies the timestep and label embedders into every block (block 0's also conditions
  the final layer) and splits qkv. Its timestep features use frequencies exp(-ln(1e4) i / (half
  - 1)) where the official DiT divides by half; that is set back, or outputs differ by ~1.
  """
  diffusers = pytest.importorskip("diffusers")
  hf = diffusers.DiTTransformer2DModel(
    num_attention_heads=HEADS,
    attention_head_dim=WIDTH // HEADS,
    in_channels=CHANNELS,
    out_channels=2 * CHANNELS,
    num_layers=DEPTH,
    sample_size=SIZE,
    patch_size=PATCH,
    num_embeds_ada_norm=CLASSES,
    norm_eps=1e-6,  # The official LayerNorms' eps.
  ).eval()
  names = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
  }
  hsd = {}
  for i in range(DEPTH):
    ours, theirs = f"transformer_blocks.{i}.", f"blocks.{i}."
    emb = ours + "norm1.emb."
    names |= {
      emb + "timestep_embedder.linear_1": "t_embedder.mlp.0",
      emb + "timestep_embedder.linear_2": "t_embedder.mlp.2",
      ours + "norm1.linear": theirs + "adaLN_modulation.1",
      ours + "attn1.to_out.0": theirs + "attn.proj",
      ours + "ff.net.0.proj": theirs + "mlp.fc1",
      ours + "ff.net.2": theirs + "mlp.fc2",
    }
    hsd[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    for j, proj in enumerate(("to_q", "to_k", "to_v")):
      for part in ("weight", "bias"):
        fused = sd[f"{theirs}attn.qkv.{part}"]
        hsd[f"{ours}attn1.{proj}.{part}"] = fused[j * WIDTH : (j + 1) * WIDTH]
    hf.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0
  for h, o in names.items():
    for part in ("weight", "bias"):
      hsd[f"{h}.{part}"] = sd[f"{o}.{part}"]
  hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hsd.items()})
  return hf


@pytest.fixture(scope="module")
def state_dict():
  return official_state_dict()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, state_dict):
  """(workdir, .pt path): the random official weights saved as a .pt and imported."""
  root = tmp_path_factory.mktemp("import")
  pt = str(root / "DiT-tiny-2.pt")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pt)
  workdir = str(root / "imported")
  path = import_dit.import_dit(pt, tiny_config(), workdir)
  assert path == os.path.join(workdir, "checkpoints", "0")
  return workdir, pt


def test_converted_official_dit_matches_diffusers(state_dict):
  config = tiny_config()
  params = convert.convert_dit(state_dict, config)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, SIZE, SIZE, CHANNELS)).astype(np.float32)
  t = np.array([3.0, 500.0, 999.0], np.float32)
  labels = np.array([0, 7, CLASSES])  # The last one is the null class.
  with torch.no_grad():
    want = diffusers_dit(state_dict)(
      torch.from_numpy(x.transpose(0, 3, 1, 2)),
      timestep=torch.from_numpy(t),
      class_labels=torch.from_numpy(labels),
    ).sample.numpy()
  got = build_model(config).apply({"params": params}, x, t, {"label": labels})
  assert got.shape == (3, SIZE, SIZE, 2 * CHANNELS)  # eps, then the variance channels.
  # float32 on both sides (measured: max difference 6e-6 on outputs of magnitude up to ~6).
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  assert np.abs(want).max() > 1.0


@pytest.mark.sharding
def test_imported_weights_restore_on_one_device_and_under_fsdp(imported, state_dict):
  workdir, pt = imported
  want = convert.convert_dit(state_dict, tiny_config())
  fsdp = tiny_config()
  fsdp.parallel.preset = "fsdp"
  fsdp.parallel.mesh.data, fsdp.parallel.mesh.fsdp = 1, 8
  for config, devices in ((tiny_config(), jax.devices()[:1]), (fsdp, jax.devices())):
    exp = experiment.build(config, devices=devices)
    params, step = runner.restore_params(exp, workdir)
    assert step == 0
    leaves = jax.tree.leaves_with_path(params)
    for (path, got), ref, sharding in zip(
      leaves, jax.tree.leaves(want), jax.tree.leaves(exp.param_shardings), strict=True
    ):
      assert got.sharding.is_equivalent_to(sharding, got.ndim), jax.tree_util.keystr(path)
      np.testing.assert_array_equal(np.asarray(got), ref, err_msg=jax.tree_util.keystr(path))
    sharded = [x for _, x in leaves if not x.sharding.is_fully_replicated]
    assert bool(sharded) == (len(devices) == 8)  # fsdp splits the kernels over the 8 devices.
  # The weights are EMA weights: raw parameters are the same ones (not stored twice).
  ckpt = checkpoint.Checkpointer(workdir, read_only=True, config=tiny_config())
  _, raw = ckpt.restore_latest_params(exp.abstract_state.params, ema=False)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(raw), want)
  assert ckpt.origin(0)["source"] == os.path.abspath(pt)
  assert set(ckpt.manager.item_metadata(0)["state"]) == {"ema_params"}
  ckpt.close()


def test_import_from_a_bucket_into_a_bucket_restores_the_same_weights(imported, gcs):
  from dit_jax import storage

  workdir, pt = imported
  url = gcs.url("import")
  storage.write_bytes(storage.join(url, "DiT-tiny-2.pt"), storage.read_bytes(pt))
  into = gcs.url("imported")
  path = import_dit.import_dit(storage.join(url, "DiT-tiny-2.pt"), tiny_config(), into)
  assert path == storage.join(into, "checkpoints", "0")
  exp = experiment.build(tiny_config(), devices=jax.devices()[:1])
  (a, step_a), (b, step_b) = (runner.restore_params(exp, w) for w in (into, workdir))
  assert step_a == step_b == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  ckpt = checkpoint.Checkpointer(into, read_only=True, config=tiny_config())
  assert ckpt.origin(0)["source"] == storage.join(url, "DiT-tiny-2.pt")
  ckpt.close()


def test_weights_of_another_variant_name_it(state_dict):
  other = official_state_dict(patch=4)
  with pytest.raises(ConfigError) as e:
    convert.convert_dit(other, tiny_config())
  msg = str(e.value)
  assert "width 64, depth 2, patch 4 (tiny/4)" in msg and "--config.model.variant=tiny/4" in msg
  assert msg.count(".") < 8  # One sentence, not one per array.
  config = tiny_config()
  config.model.learn_sigma, config.model.num_classes = False, 1000
  with pytest.raises(ConfigError) as e:
    convert.convert_dit(state_dict, config)
  msg = str(e.value)
  assert "--config.model.learn_sigma=True" in msg and "--config.model.num_classes=10" in msg, msg
  config = tiny_config()
  config.data.image_size = 32
  with pytest.raises(ConfigError, match="--config.data.image_size=16"):
    convert.convert_dit(state_dict, config)
  broken = {k: v for k, v in state_dict.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(ConfigError, match="blocks.1.mlp.fc2.bias"):
    convert.convert_dit(broken, tiny_config())
  bad = dict(state_dict, **{"blocks.0.attn.proj.weight": np.zeros((64, 32), np.float32)})
  with pytest.raises(
    ConfigError, match=r"blocks.0.attn.proj.weight: \(64, 32\), expected \(64, 64\)"
  ):
    convert.convert_dit(bad, tiny_config())


def test_train_py_checkpoints_give_their_ema_weights(tmp_path, state_dict):
  import argparse

  ema = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  model = {k: v + 1.0 for k, v in ema.items()}
  pt = str(tmp_path / "0001000.pt")
  torch.save({"model": model, "ema": ema, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, pt)
  loaded = convert.load_dit_pt(pt)
  assert sorted(loaded) == sorted(state_dict)
  for k, v in state_dict.items():
    np.testing.assert_array_equal(loaded[k], v)
  with open(tmp_path / "junk.pt", "wb") as f:
    f.write(b"not a checkpoint")
  with pytest.raises(ConfigError, match="junk.pt"):
    convert.load_dit_pt(str(tmp_path / "junk.pt"))


def _files(directory):
  """{path: (size, mtime)} of every file under `directory`."""
  return {
    os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
    for d, _, files in os.walk(directory)
    for f in files
  }


def test_import_refuses_a_workdir_with_checkpoints_and_training_it_points_to_init_from(imported):
  workdir, pt = imported
  before = _files(workdir)
  with pytest.raises(ConfigError, match="not empty"):
    import_dit.import_dit(pt, tiny_config(), workdir)
  assert _files(workdir) == before
  with pytest.raises(ConfigError, match=f"--config.train.init_from={workdir}"):
    loop.run(tiny_config(), workdir)
  assert _files(workdir) == before


@pytest.mark.integration
def test_init_from_starts_a_new_run_at_step_0_from_the_imported_weights(
  tmp_path, imported, state_dict, monkeypatch
):
  workdir, _ = imported
  want = convert.convert_dit(state_dict, tiny_config())
  first = {}
  jit_train_step = experiment.Experiment.jit_train_step

  def spy(exp):  # Records the state that the first train step receives.
    step = jit_train_step(exp)

    def run(state, batch):
      first.setdefault("state", jax.device_get(state))
      return step(state, batch)

    return run

  monkeypatch.setattr(experiment.Experiment, "jit_train_step", spy)
  config = tiny_config()
  config.train.init_from = workdir
  run = str(tmp_path / "finetune")
  loop.run(config, run)
  state = first["state"]
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, state.params, want)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, want)
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)  # Fresh Adam.
  assert checkpoint.Checkpointer(run, read_only=True).all_steps() == [2]
  # Once the run has checkpoints it resumes from them; init_from (here: nothing) is not read.
  config.train.init_from = str(tmp_path / "empty")
  loop.run(config, run)
  # A model of another architecture cannot start from these weights.
  other = tiny_config("tiny/4")
  with pytest.raises(ConfigError, match="patch_embed/kernel"):
    checkpoint.restore_weights(workdir, experiment.build(other).abstract_state.params, other)
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    checkpoint.restore_weights(
      str(tmp_path / "empty"), experiment.build(config).abstract_state.params
    )


@pytest.mark.multiprocess
def test_cli_reports_a_variant_mismatch_in_one_line(imported, tmp_path):
  _, pt = imported
  out = str(tmp_path / "xl")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dit_jax.tools.import_dit",
      f"--checkpoint={pt}",
      "--config=configs/dit_imagenet256.py:variant=XL/2",
      f"--workdir={out}",
    ],
    cwd=REPO,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and last.startswith("Error: "), proc.stderr[-2000:]
  assert "(tiny/2)" in last and "--config.model.variant=tiny/2" in last, last
  assert "--config.model.num_classes=10" in last and "--config.data.image_size=16" in last, last
  assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_dit_attention_is_initialized_like_the_fused_qkv_of_the_release():
  d = 768
  attention = layers.Attention(heads=12)
  variables = jax.jit(attention.init)(jax.random.key(0), np.zeros((1, 4, d), np.float32))
  attn = nn.meta.unbox(variables["params"])
  for name in ("query", "key", "value"):
    std = float(np.std(attn[name]["kernel"]))
    assert abs(std / (2 / (d + 3 * d)) ** 0.5 - 1) < 0.02, (name, std)  # xavier over [D, 3D]
  assert not np.array_equal(attn["query"]["kernel"], attn["key"]["kernel"])
  std_out = float(np.std(attn["out"]["kernel"]))
  assert abs(std_out / (2 / (2 * d)) ** 0.5 - 1) < 0.02, std_out  # The output stays [D, D].


def test_sd3_import_names_the_flags_it_needs_then_restores(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  from dit_jax.tools import import_sd3

  torch.manual_seed(0)
  diffusers.SD3Transformer2DModel(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=12,
  ).save_pretrained(tmp_path / "transformer")
  config = base_config()
  config.model.name, config.model.variant, config.model.width = "mmdit", "d2", 32
  config.data.name, config.data.image_size, config.data.channels = "synthetic", 8, 4
  config.model.context_len, config.model.context_dim, config.model.pooled_dim = 5, 24, 16
  config.train.batch_size = 8
  workdir = str(tmp_path / "sd3")
  with pytest.raises(ConfigError) as e:  # SD3-medium style: no QK-norm, a 12-wide table.
    import_sd3.import_sd3(str(tmp_path / "transformer"), config, workdir)
  msg = str(e.value)
  for flag in ("model.qk_norm=False", "model.pos_embed_max_size=12", "model.pos_embed_base_size=4"):
    assert f"--config.{flag}" in msg, msg
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "0"))
  config.model.qk_norm = False
  config.model.pos_embed_max_size, config.model.pos_embed_base_size = 12, 4
  import_sd3.import_sd3(str(tmp_path / "transformer"), config, workdir)
  want, _ = convert.load_sd3(str(tmp_path / "transformer"))
  params, step = runner.restore_params(experiment.build(config), workdir)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), want)
