"""The noise-aware classifier of classifier guidance (`model.name="classifier"`): its outputs and
sharding, its training by the common trainer, `log_prob_grad`, its evaluation and its bad input."""

import importlib.util
import json
import os

import _cli
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checks, experiment, models, parallel
from dit_jax.errors import ConfigError
from dit_jax.models.classifier import log_prob_grad

CONFIG = os.path.join(_cli.REPO, "configs", "quickstart_classifier.py")


def classifier_config(**fields):
  """configs/quickstart_classifier.py shrunk to seconds, with `section__name=value` on top."""
  spec = importlib.util.spec_from_file_location("quickstart_classifier", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.variant, c.model.depth = "tiny/4", 0
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 16, 4, 0
  c.train.log_every = c.train.checkpoint_every = 2
  c.train.lr, c.train.lr_schedule, c.train.ema_decay = 3e-3, "constant", 0.0
  c.eval.num_images = 40
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.image_size
  labels = rng.integers(0, config.model.num_classes, (b,)).astype(np.int32)
  # Class k is a fixed random +-1 image (plus a little noise): learnable in a few steps.
  templates = np.sign(np.random.default_rng(123).standard_normal((config.model.num_classes, s, s)))
  image = templates[labels][..., None] + 0.1 * rng.standard_normal((b, s, s, 1))
  return {"image": image.astype(np.float32), "label": labels}


def _params(config, scale=0.0, seed=0):
  """A classifier of `config` and its initial parameters (plus Gaussian noise of `scale`, so that
  the zero-initialized head and gates do not hide the input)."""
  model = models.build_model(config)
  s = config.data.image_size
  z, t = jnp.zeros((2, s, s, 1)), jnp.zeros((2,))
  params = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(seed), z, t)["params"])())
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  return model, jax.tree.unflatten(tree, leaves)


def test_logits_are_float32_per_class_and_ignore_the_labels():
  config = classifier_config()
  model, params = _params(config, scale=0.1)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((4, 16, 16, 1)), jnp.float32)
  t = jnp.asarray([0.0, 0.3, 0.6, 0.9])
  apply = jax.jit(model.apply)
  out = apply({"params": params}, z, t, {"label": jnp.arange(4)})
  assert out.shape == (4, config.model.num_classes) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  # Labels are targets, never inputs: other labels (or none) give the very same logits.
  for cond in ({"label": jnp.full((4,), 9)}, None):
    np.testing.assert_array_equal(apply({"params": params}, z, t, cond), out)
  # ... while the time does matter.
  assert not np.allclose(apply({"params": params}, z, t[::-1], None), out)


def _one_step(config, devices, step=None):
  """(experiment, parameters and metrics after one step from init, the jitted step)."""
  exp = experiment.build(config, devices=devices)
  state = exp.init_state()
  step = step or exp.jit_train_step()
  with exp.context():
    batch = parallel.global_batch(_batch(config), exp.mesh)
    state, metrics = step(state, batch)
  return exp, jax.device_get(state.params), jax.device_get(metrics), step


@pytest.fixture(scope="module")
def one_device():
  return _one_step(classifier_config(), jax.devices()[:1])


@pytest.mark.sharding
def test_fsdp_tp_on_8_devices_matches_1_device(one_device):
  config = classifier_config(parallel__preset="fsdp_tp")
  config.parallel.mesh.data, config.parallel.mesh.fsdp, config.parallel.mesh.tensor = 2, 2, 2
  exp, params, metrics, _ = _one_step(config, jax.devices())
  # The blocks' kernels are split over fsdp like the DiT's: the classifier speaks the same axes.
  for path, s in jax.tree.leaves_with_path(exp.state_shardings.params):
    if "kernel" in jax.tree_util.keystr(path) and "blocks" in jax.tree_util.keystr(path):
      assert "fsdp" in jax.tree.leaves(tuple(s.spec)), (path, s.spec)
  _, ref_params, ref_metrics, _ = one_device
  assert set(metrics) >= {"loss", "accuracy"}
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  assert metrics["accuracy"] == ref_metrics["accuracy"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


def test_training_lowers_the_cross_entropy(one_device):
  config = classifier_config()
  exp, _, _, step = one_device
  state = exp.init_state()
  batch = _batch(config)
  x0, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  t = exp.diffusion.schedule.from_unit(jnp.full((len(labels),), 0.2))
  alpha, sigma = exp.diffusion.alpha_sigma(t)
  z = alpha * x0 + sigma * jax.random.normal(jax.random.key(7), x0.shape)

  def ce(params):
    logits = exp.model.apply({"params": params}, z, exp.diffusion.schedule.model_time(t), None)
    return float(-jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]))

  before = ce(state.params)
  with exp.context():
    for i in range(30):
      state, metrics = step(state, parallel.global_batch(_batch(config, seed=i), exp.mesh))
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
  assert ce(state.params) < 0.75 * before, (before, ce(state.params))


def test_log_prob_grad_is_finite_per_row_and_matches_finite_differences():
  config = classifier_config()
  model, params = _params(config, scale=0.2, seed=3)

  apply = jax.jit(model.apply)

  def apply_fn(z, t):
    return apply({"params": params}, z, t)

  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((3, 16, 16, 1)), jnp.float32)
  t = jnp.asarray([0.1, 0.5, 0.9])
  labels = jnp.asarray([2, 5, 7], jnp.int32)
  grad = jax.jit(log_prob_grad, static_argnums=0)(apply_fn, z, t, labels)
  assert grad.shape == z.shape and grad.dtype == jnp.float32
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0

  def log_prob(z):
    logp = jax.nn.log_softmax(apply_fn(z, t), axis=-1)
    return np.asarray(logp[jnp.arange(3), labels], np.float64)  # [B]

  # Each row's gradient is its own: a step along v in row i changes row i's log p only.
  v = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
  h = 1e-3
  fd = (log_prob(z + h * v) - log_prob(z - h * v)) / (2 * h)  # [B]
  np.testing.assert_allclose(np.sum(np.asarray(grad * v), axis=(1, 2, 3)), fd, rtol=1e-2)
  alone = log_prob_grad(apply_fn, z[1:2], t[1:2], labels[1:2])
  # Equal up to float32 summation order, which XLA may choose by batch size: relative to the
  # gradient's scale, not per element (a near-zero element differs at rounding level).
  scale = float(np.abs(grad[1]).max())
  np.testing.assert_allclose(alone[0], grad[1], rtol=1e-4, atol=1e-4 * scale)


def test_evaluate_reports_accuracy_by_noise_level_and_sample_is_a_clear_error(
  classifier_workdir, tmp_path
):
  from dit_jax.evaluation import runner

  workdir = _cli.copy_workdir(classifier_workdir, str(tmp_path / "clf"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert logged and all({"loss", "accuracy"} <= set(m) for m in logged)  # Trained by the CLI.
  config = _cli.tiny_config("configs/quickstart_classifier.py", train__num_steps=4)
  scores = runner.evaluate(config, workdir)
  levels = [k for k in scores if k.startswith("accuracy_u")]
  assert len(levels) >= 5 and scores["num_images"] == 8
  assert all(0 <= scores[k] <= 1 for k in levels)
  with pytest.raises(ConfigError, match="classifier"):
    runner.sample(config, workdir)


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"model__learn_sigma": True}, "learn_sigma"),
    ({"data__name": "shapes", "data__channels": 3}, "class-labelled"),
    ({"train__eval_every": 2}, "eval_every"),
    ({"model__variant": "XL/3"}, "variant"),
  ],
)
def test_bad_classifier_configs_are_clear_errors(fields, match):
  config = classifier_config(**fields)
  with pytest.raises(ConfigError, match=match):  # As a program checks it: first, then builds.
    checks.validate(config)
    experiment.build(config, devices=jax.devices()[:1])


@pytest.mark.multiprocess
def test_sampling_a_classifier_workdir_is_one_clear_line(tmp_path):
  proc = _cli.run(f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", "--mode=sample")
  _cli.assert_clear_error(proc, "classifier")
