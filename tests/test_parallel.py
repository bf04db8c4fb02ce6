"""Sharding on 8 fake CPU devices: layouts, bytes per device, presets agreeing with 1 device."""

import jax
import numpy as np
import pytest

from dit_jax import experiment, parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError

pytestmark = pytest.mark.sharding

# (preset, mesh data/fsdp/tensor) on 8 devices.
LAYOUTS = {
  "dp": ("dp", (8, 1, 1)),
  "fsdp": ("fsdp", (1, 8, 1)),
  "fsdp_tp": ("fsdp_tp", (2, 2, 2)),
}


def config_for(preset="dp", mesh=(-1, 1, 1), variant="tiny/4"):
  c = base_config()
  c.model.variant = variant
  c.data.image_size = 16
  c.train.batch_size = 16
  c.train.lr = 1e-3
  c.train.warmup_steps = 0
  c.train.ema_decay = 0.9
  c.parallel.preset = preset
  c.parallel.mesh.data, c.parallel.mesh.fsdp, c.parallel.mesh.tensor = mesh
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.image_size
  return {
    "image": rng.uniform(-1, 1, (b, s, s, config.data.channels)).astype(np.float32),
    "label": rng.integers(0, config.model.num_classes, (b,)).astype(np.int32),
  }


def _bytes_on(tree, device) -> int:
  """Bytes of `tree`'s arrays that live on `device`."""
  return sum(
    s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device
  )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_array_of_the_state_has_a_mesh_sharding(name):
  exp = experiment.build(config_for(*LAYOUTS[name]))
  leaves = jax.tree.leaves(exp.state_shardings)
  assert len(leaves) == len(jax.tree.leaves(exp.abstract_state))
  for s in leaves:
    assert isinstance(s, jax.sharding.NamedSharding) and s.mesh.shape == exp.mesh.shape
  if name != "dp":  # The kernels of every block are split over fsdp.
    specs = jax.tree.leaves_with_path(exp.state_shardings.params)
    for path, s in specs:
      if "kernel" in jax.tree_util.keystr(path) and "blocks" in jax.tree_util.keystr(path):
        assert "fsdp" in jax.tree.leaves(tuple(s.spec)), (path, s.spec)


def test_fsdp_holds_an_eighth_of_the_state_per_device():
  exp = experiment.build(config_for("fsdp", (1, 8, 1), variant="mini/4"))
  state = exp.init_state()
  parts = {"params": state.params, "optimizer": state.opt_state, "ema": state.ema_params}
  for part, tree in parts.items():
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    fractions = [_bytes_on(tree, d) / total for d in exp.mesh.devices.flat]
    print(f"fsdp x8, {part}: {total / 2**20:.2f} MiB in all, per device {max(fractions):.4f}")
    # A few small vectors without an embed axis (e.g. the timestep MLP's biases) stay replicated.
    assert max(fractions) < 1 / 8 * 1.05, (part, fractions)
  dp = experiment.build(config_for("dp", (8, 1, 1), variant="mini/4"))
  dp_params = dp.init_state().params
  total = sum(x.nbytes for x in jax.tree.leaves(dp_params))
  assert _bytes_on(dp_params, dp.mesh.devices.flat[0]) == total  # dp replicates everything.


def test_sharded_init_equals_single_device_init():
  one = experiment.build(config_for(), devices=jax.devices()[:1]).init_state()
  for name in LAYOUTS:
    many = experiment.build(config_for(*LAYOUTS[name])).init_state()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
      np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(a) if _is_key(a) else a),
        np.asarray(jax.random.key_data(b) if _is_key(b) else b),
      )


def _is_key(x):
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


# Steps on 8 devices equal steps on 1 device up to float32 reduction order: losses and gradient
# norms to 1e-6 relative, every updated parameter to 1e-5 absolute (Adam moves each by ~lr).
LOSS_RTOL, PARAM_ATOL = 1e-6, 1e-5


def _one_step(config, devices, steps=1):
  """Params after `steps` train steps on fixed batches, and each step's (loss, gradient norm)."""
  exp = experiment.build(config, devices=devices)
  state = exp.init_state()
  step, curve = exp.jit_train_step(), []
  with exp.context():
    for i in range(steps):
      state, metrics = step(state, parallel.global_batch(_batch(config, seed=i), exp.mesh))
      curve.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return jax.device_get(state.params), curve


# Two steps: adaLN-Zero's zero output layer makes the first gradient blind to the conditioning
# (labels and timesteps reach the adaLN weights' gradient only once that layer has moved), so the
# first step's parameters match even with labels paired to the wrong rows; the second's do not.
@pytest.fixture(scope="module")
def one_device_steps():
  return _one_step(config_for(), jax.devices()[:1], steps=2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_steps_match_one_device(name, one_device_steps):
  ref_params, ref_curve = one_device_steps
  params, curve = _one_step(config_for(*LAYOUTS[name]), jax.devices(), steps=2)
  np.testing.assert_allclose(curve, ref_curve, rtol=LOSS_RTOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PARAM_ATOL), params, ref_params)


def test_batch_that_does_not_divide_the_data_axes_is_a_clear_error():
  config = config_for("fsdp_tp", (2, 2, 2))
  config.train.batch_size = 10  # data x fsdp = 4 devices.
  with pytest.raises(ConfigError, match=r"config.train.batch_size=10 must be a positive multiple"):
    experiment.build(config)
  config.train.batch_size = 12
  assert parallel.data_parallel_size(experiment.build(config).mesh) == 4
  # Sampling restores a checkpoint onto any device count, whatever batch trained it.
  config = config_for("dp")
  with pytest.raises(ConfigError, match=r"config.train.batch_size=16"):
    experiment.build(config, devices=jax.devices()[:3])
  assert experiment.build(config, devices=jax.devices()[:3], training=False).mesh.size == 3


def test_rules_override_the_preset_field_by_field():
  config = config_for("dp", (4, 1, 2))
  config.parallel.rules.mlp = "tensor"
  config.parallel.rules.batch = "data"
  rules = dict(parallel.axis_rules(config))
  assert rules == {"batch": "data", "mlp": "tensor"}
  exp = experiment.build(config)
  fc1 = exp.state_shardings.params["blocks"]["mlp"]["fc1"]["kernel"]
  assert tuple(fc1.spec) == (None, None, "tensor")  # (layers, embed, mlp)
  config.parallel.rules.embed = "fsdp,model"
  with pytest.raises(ConfigError, match=r"config.parallel.rules.embed='fsdp,model'"):
    parallel.axis_rules(config)


@pytest.mark.parametrize(
  "mesh, dcn, match",
  [
    ((-1, -1, 1), (1, 1, 1), "Only one of"),
    ((3, 1, 1), (1, 1, 1), "does not fit 8 devices"),
    ((2, 2, 1), (1, 1, 1), "uses 4 devices but 8 are present"),
    ((-1, 1, 1), (2, 1, 1), "needs multi-slice devices"),
    ((-1, 1, 1), (3, 1, 1), "does not divide the 8 devices"),
    ((-1, 1, 1), (-1, -1, 1), r"-1 \(at most one\)"),
    ((-1, 1, 1), (0, 1, 1), "every size must be >= 1"),
  ],
)
def test_bad_meshes_name_the_field(mesh, dcn, match):
  config = config_for("dp", mesh)
  config.parallel.dcn_mesh.data, config.parallel.dcn_mesh.fsdp, config.parallel.dcn_mesh.tensor = (
    dcn
  )
  with pytest.raises(ConfigError, match=match):
    parallel.make_mesh(config)
