"""The guidance family: guidance interval, CADS, autoguidance (classifier guidance's own tests are
in tests/test_classifier.py). Invariants, not figures: each method at its neutral setting gives
plain sampling bitwise; CADS follows its gamma(t) schedule; bad settings are one clear error."""

import _cli
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checks, experiment, parallel
from dit_jax.config_defaults import base_config
from dit_jax.diffusion import guidance
from dit_jax.errors import ConfigError
from dit_jax.evaluation import guides, runner, sampling

# --- CADS's schedule and perturbation ------------------------------------------------------------


def test_cads_gamma_follows_the_papers_schedule():
  cads = guidance.CADS(noise_scale=0.25, tau1=0.6, tau2=0.9)
  u = jnp.array([0.0, 0.3, 0.6, 0.65, 0.75, 0.85, 0.9, 0.95, 1.0])
  expect = np.clip((0.9 - np.asarray(u)) / 0.3, 0, 1)
  np.testing.assert_allclose(cads.gamma(u), expect, atol=1e-6)
  assert np.all(np.asarray(cads.gamma(u))[:3] == 1.0) and np.all(np.asarray(cads.gamma(u))[6:] == 0)
  assert np.all(np.diff(np.asarray(cads.gamma(u))) <= 0)  # Monotone: more noise, less condition.


@pytest.mark.parametrize("rescale", [False, True])
def test_cads_keeps_the_condition_below_tau1_and_replaces_it_above_tau2(rescale):
  y = jax.random.normal(jax.random.key(0), (6, 32)) * 3.0 + 1.0
  noise = jax.random.normal(jax.random.key(1), (6, 32))
  cads = guidance.CADS(noise_scale=0.5, tau1=0.4, tau2=0.8, psi=1.0, rescale=rescale)
  for u in (0.0, 0.2, 0.4):
    np.testing.assert_array_equal(cads.perturb(y, jnp.float32(u), noise), y)  # Bitwise.
  for u in (0.8, 0.9, 1.0):
    out = cads.perturb(y, jnp.float32(u), noise)
    if rescale:  # Pure noise, moved to the condition's own mean and spread.
      np.testing.assert_allclose(jnp.mean(out, 1), jnp.mean(y, 1), atol=1e-5)
      np.testing.assert_allclose(jnp.std(out, 1), jnp.std(y, 1), rtol=1e-5)
      z = (noise - noise.mean(1, keepdims=True)) / noise.std(1, keepdims=True)
      np.testing.assert_allclose(
        out, z * y.std(1, keepdims=True) + y.mean(1, keepdims=True), atol=1e-4
      )
    else:
      np.testing.assert_allclose(out, 0.5 * noise, atol=1e-6)  # s x pure noise.
  mid = cads.perturb(y, jnp.float32(0.6), noise)
  if not rescale:
    np.testing.assert_allclose(mid, np.sqrt(0.5) * y + 0.5 * np.sqrt(0.5) * noise, atol=1e-5)


def test_cads_noise_is_per_sample_and_per_step():
  cads = guidance.CADS(noise_scale=1.0, tau1=0.1, tau2=0.2, rescale=False)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4))
  y = jnp.zeros((4, 8))
  a = guidance.cads_perturbation(cads, 0.5, keys, jnp.float32(500.0))(y)
  b = guidance.cads_perturbation(cads, 0.5, keys[2:], jnp.float32(500.0))(y[2:])
  c = guidance.cads_perturbation(cads, 0.5, keys, jnp.float32(499.0))(y)
  np.testing.assert_array_equal(a[2:], b)  # Sample i's noise does not depend on its batch.
  assert not np.allclose(a, c)  # A fresh draw at every solver evaluation.
  assert not np.allclose(a[0], a[1])


# --- The guided denoiser ------------------------------------------------------------------------


def _toy():
  def apply(z, t, c, perturb=None):
    label = c["label"].astype(jnp.float32)
    if perturb is not None:
      label = perturb(label[:, None])[:, 0]
    return z * (1.0 + label[:, None, None, None]) + 0.01 * t[:, None, None, None]

  z = jax.random.normal(jax.random.key(0), (3, 2, 2, 2))
  cond, null = {"label": jnp.array([1, 2, 3])}, {"label": jnp.array([9, 9, 9])}
  return apply, z, cond, null


def test_interval_guides_inside_and_runs_the_conditional_pass_outside():
  apply, z, cond, null = _toy()
  plain = guidance.guided(apply, cond, null, 3.0, 2)
  inside = guidance.guided(apply, cond, null, 3.0, 2, in_interval=lambda t: t > 400)
  everywhere = guidance.guided(apply, cond, null, 3.0, 2, in_interval=lambda t: t >= 0)
  for t in (100.0, 500.0):  # (lax.cond compiles its branches: equal to float32 rounding.)
    tt = jnp.full((3,), t)
    np.testing.assert_allclose(everywhere(z, tt), plain(z, tt), rtol=1e-6, atol=1e-6)
    expect = plain(z, tt) if t > 400 else apply(z, tt, cond)
    np.testing.assert_allclose(inside(z, tt), expect, rtol=1e-6, atol=1e-6)
  assert not np.allclose(plain(z, jnp.full((3,), 100.0)), apply(z, jnp.full((3,), 100.0), cond))


def test_autoguidance_with_the_main_model_as_guide_is_the_conditional_output():
  apply, z, cond, null = _toy()
  t = jnp.full((3,), 300.0)
  auto = guidance.guided(apply, cond, null, 4.0, 2, guide_apply=apply)(z, t)
  np.testing.assert_array_equal(auto, apply(z, t, cond))

  def weaker(z, t, c, perturb=None):
    return 0.5 * apply(z, t, c, perturb)

  out = guidance.guided(apply, cond, null, 4.0, 2, guide_apply=weaker)(z, t)
  main, guide = apply(z, t, cond), weaker(z, t, cond)
  np.testing.assert_allclose(out, guide + 4.0 * (main - guide), rtol=1e-5)


def test_cads_perturbs_the_conditional_pass_only():
  apply, z, cond, null = _toy()
  seen = []

  def recording(z, t, c, perturb=None):
    seen.append(perturb(jnp.ones((6, 1))))
    return apply(z, t, c, perturb)

  guidance.guided(
    recording, cond, null, 2.0, 2, perturbation=lambda t: lambda x: jax.tree.map(lambda a: 5 * a, x)
  )(z, jnp.full((3,), 1.0))
  np.testing.assert_array_equal(seen[0][:, 0], [5, 5, 5, 1, 1, 1])


# --- Sampling: neutral settings reproduce plain sampling -----------------------------------------


def _tiny(objective: str, sampler: str):
  c = base_config()
  c.model.variant = "tiny/4"
  c.diffusion.objective = objective
  c.data.image_size, c.data.channels = 8, 1
  c.sample.sampler = sampler
  c.sample.num_steps = 3
  c.sample.guidance_scale = 2.0
  c.sample.batch_size = 8
  return c


def _random_params(exp):
  leaves, tree = jax.tree.flatten(exp.init_state().ema_params)
  rng = np.random.default_rng(0)
  noisy = [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  return jax.device_put(jax.tree.unflatten(tree, noisy), exp.param_shardings)


def _samples(config, params=None):
  exp = experiment.build(config, training=False)
  params = _random_params(exp) if params is None else params
  images, _ = sampling.generate(exp, params, 8, seed=0, progress=False)
  return images, params


@pytest.mark.integration
@pytest.mark.parametrize(
  "objective,sampler",
  [("eps", "ddpm"), ("v", "ddim"), ("eps", "heun"), ("rectified_flow", "euler")],
)
def test_neutral_interval_and_cads_reproduce_plain_sampling(objective, sampler):
  config = _tiny(objective, sampler)
  plain, params = _samples(config)
  config.sample.guidance_interval = (0.0, 1e9)  # Covers every noise level.
  np.testing.assert_array_equal(_samples(config, params)[0], plain)
  config.sample.guidance_interval = ()
  if objective == "rectified_flow":  # Flow's grid starts at t = 1, where CADS always acts.
    config.sample.guidance_interval = (1e8, 1e9)  # Guides nowhere: the conditional model alone.
    unguided = _tiny(objective, sampler)
    unguided.sample.guidance_scale = 1.0
    np.testing.assert_array_equal(_samples(config, params)[0], _samples(unguided, params)[0])
    return
  config.sample.cads.noise_scale = 1.0  # VP times u = t / T stay below 0.9995: gamma = 1.
  config.sample.cads.tau1, config.sample.cads.tau2 = 0.9995, 1.0
  np.testing.assert_array_equal(_samples(config, params)[0], plain)
  if sampler == "ddim":
    config.sample.cads.tau1, config.sample.cads.tau2 = 0.1, 0.5  # Now it acts.
    assert not np.allclose(_samples(config, params)[0], plain)


def test_interval_counts_the_passes_it_saves():
  config = _tiny("eps", "heun")
  config.sample.num_steps = 10
  exp_diffusion = experiment.build(config, training=False).diffusion
  times = exp_diffusion.evaluation_times("heun", 10)
  assert len(times) == 2 * 10 - 1  # Heun: two evaluations a step, one in the last.
  levels = exp_diffusion.schedule.noise_level(times)
  lo, hi = float(np.quantile(levels, 0.25)), float(np.quantile(levels, 0.75))
  config.sample.guidance_interval = (lo, hi)
  passes = guides.interval_passes(config, exp_diffusion)
  inside = int(np.sum((levels > lo) & (levels <= hi)))
  assert passes == {
    "evaluations": 19,
    "guided": inside,
    "passes": 19 + inside,
    "saved": 19 - inside,
  }
  assert 0 < inside < 19


def test_guide_equal_to_the_main_model_reproduces_unguided_sampling(trained_workdir):
  config = _cli.tiny_config()
  exp = experiment.build(config, training=False)
  params, step = runner.restore_params(exp, trained_workdir)
  unguided = _cli.tiny_config(sample__guidance_scale=1.0)
  plain, _ = sampling.generate(
    experiment.build(unguided, training=False), params, 8, seed=0, progress=False
  )
  auto = _cli.tiny_config(sample__guidance_scale=3.0)
  auto.sample.guide.workdir = trained_workdir
  auto_exp = experiment.build(auto, training=False)
  same, _ = sampling.generate(auto_exp, params, 8, seed=0, progress=False)
  np.testing.assert_array_equal(same, plain)
  auto.sample.guide.step = 2  # An earlier checkpoint: a real guide now.
  earlier, _ = sampling.generate(
    experiment.build(auto, training=False), params, 8, seed=0, progress=False
  )
  assert np.all(np.isfinite(earlier)) and not np.allclose(earlier, plain)


# --- Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("guidance_interval", (2.0, 1.0), "is not an interval"),
    ("guidance_interval", (1.0, 1.0), "is not an interval"),
    ("guidance_interval", (0.5,), "is not an interval"),
    ("guidance_interval", (-1.0, 2.0), "is not an interval"),
    ("cads.tau1", 0.95, "must be below tau2"),
    ("cads.noise_scale", -0.1, "noise_scale=-0.1 must be >= 0"),
    ("cads.psi", 1.5, "psi=1.5 must be in [0, 1]"),
    ("classifier.scale", 1.0, "needs config.sample.classifier.workdir"),
    ("guide.variant", "tiny/2", "needs config.sample.guide.workdir"),
  ],
)
def test_bad_guidance_settings_are_one_clear_error(field, value, message):
  config = _tiny("eps", "ddim")
  section = config.sample
  *path, name = field.split(".")
  for part in path:
    section = section[part]
  section[name] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    checks.validate(config)


def test_a_guide_or_classifier_of_another_model_is_one_clear_error(trained_workdir):
  config = _cli.tiny_config(sample__guidance_scale=3.0)
  config.data.image_size = 8  # The guide was trained on 16x16 digits.
  config.sample.guide.workdir = trained_workdir
  exp = experiment.build(config, training=False)
  with pytest.raises(
    ConfigError, match="was trained on 16x16x1 inputs, but this model makes 8x8x1"
  ):
    sampling.make_sampler(exp)
  config = _cli.tiny_config()
  config.sample.classifier.workdir, config.sample.classifier.scale = trained_workdir, 1.0
  with pytest.raises(ConfigError, match="holds a 'dit' model, not a noise-aware classifier"):
    sampling.make_sampler(experiment.build(config, training=False))


@pytest.mark.multiprocess
def test_cli_empty_interval_is_one_clear_line(trained_workdir):
  proc = _cli.run(
    *_cli.TINY,
    f"--workdir={trained_workdir}",
    "--mode=sample",
    "--config.sample.guidance_interval=(3.0,0.5)",
  )
  _cli.assert_clear_error(proc, "config.sample.guidance_interval=(3.0, 0.5) is not an interval")


# --- Classifier guidance --------------------------------------------------------------------------


@pytest.mark.sharding
def test_classifier_gradients_are_finite_and_sharded_like_the_batch(classifier_workdir):
  config = _cli.tiny_config()
  config.sample.classifier.workdir, config.sample.classifier.scale = classifier_workdir, 2.0
  exp = experiment.build(config, training=False)  # 8 devices: the batch split over them.
  classifier = guides.load_classifier(config, exp.mesh)
  batch = parallel.batch_sharding(exp.mesh)
  z = jax.device_put(jax.random.normal(jax.random.key(0), (8, 16, 16, 1)), batch)
  t = jax.device_put(jnp.full((8,), 300.0), batch)
  labels = jax.device_put(jnp.arange(8) % 10, batch)
  with exp.context():
    grad = jax.jit(guides.classifier_gradient(classifier.exp.model, classifier.params, labels, 2.0))
    g = grad(z, t)
  assert g.shape == z.shape and np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
  assert g.sharding.is_equivalent_to(batch, g.ndim), g.sharding


@pytest.fixture(scope="module")
def eps_classifier_workdir(tmp_path_factory):
  """The tiny classifier of `classifier_workdir`, trained under the eps objective's noise."""
  workdir = str(tmp_path_factory.mktemp("eps_classifier") / "run")
  flags = [f for f in _cli.TINY if not f.startswith(("--config=", "--config.train.num_steps"))]
  proc = _cli.run(
    "--config=configs/quickstart_classifier.py",
    *flags,
    "--config.train.num_steps=2",
    "--config.diffusion.objective=eps",
    f"--workdir={workdir}",
  )
  assert proc.returncode == 0, proc.output[-3000:]
  return workdir


@pytest.mark.integration
@pytest.mark.parametrize(
  "objective,sampler",
  [("eps", "ddpm"), ("eps", "ddim"), ("rectified_flow", "euler"), ("rectified_flow", "heun")],
)
def test_classifier_guidance_steers_every_sampler_and_scale_zero_is_plain(
  classifier_workdir, eps_classifier_workdir, objective, sampler
):
  config = _tiny(objective, sampler)
  config.data.image_size = 16  # The digits classifier's inputs.
  plain, params = _samples(config)
  flow = objective == "rectified_flow"
  config.sample.classifier.workdir = classifier_workdir if flow else eps_classifier_workdir
  if sampler == "ddpm":  # Scale 0 loads nothing: the plain sampler (checked once).
    config.sample.classifier.scale = 0.0
    np.testing.assert_array_equal(_samples(config, params)[0], plain)
  config.sample.classifier.scale = 50.0
  guided = _samples(config, params)[0]
  assert np.all(np.isfinite(guided)) and not np.allclose(guided, plain)
  # A classifier of another noise process: one clear error.
  config.sample.classifier.workdir = eps_classifier_workdir if flow else classifier_workdir
  with pytest.raises(ConfigError, match="was trained on the noise process"):
    _samples(config, params)


def test_a_classifier_of_other_classes_is_one_clear_error(classifier_workdir):
  config = _cli.tiny_config(model__num_classes=5)
  config.sample.classifier.workdir, config.sample.classifier.scale = classifier_workdir, 1.0
  with pytest.raises(ConfigError, match="classifies 10 classes, but this model has"):
    sampling.make_sampler(experiment.build(config, training=False))


@pytest.mark.integration
def test_interval_and_cads_act_on_text_conditions():
  """MMDiT on the built-in shapes captions: the interval covering everything is plain CFG
  bitwise; CADS perturbs the text embeddings (samples change, stay finite)."""
  config = _cli.tiny_config("configs/quickstart_t2i.py")
  config.model.variant, config.model.width, config.model.heads = "d2", 64, 2
  config.sample.num_steps, config.sample.guidance_scale = 3, 2.0
  config.sample.clip_denoised = False
  plain, params = _samples(config)
  config.sample.guidance_interval = (0.0, 2.0)  # Flow times t are in [0, 1].
  np.testing.assert_array_equal(_samples(config, params)[0], plain)
  config.sample.guidance_interval = ()
  config.sample.cads.noise_scale, config.sample.cads.tau1, config.sample.cads.tau2 = 0.5, 0.1, 0.5
  cads = _samples(config, params)[0]
  assert np.all(np.isfinite(cads)) and not np.allclose(cads, plain)
