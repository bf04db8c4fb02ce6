"""Mixed precision: `model.dtype="bfloat16"` computes the matmuls in bfloat16 while the parameters,
optimizer state, EMA, residual stream, normalization statistics, softmax, timestep features, final
layer, loss and sampler stay float32, so a bfloat16 step tracks the float32 step from the same
state.

Tolerances come from bfloat16's unit roundoff U = 2^-8 (8 significant bits). Every matmul input
is rounded by at most U relative, independently, so a tiny model's output is off by less than one
U in the relative L2 norm (measured 0.7-0.8 U; 1.8-1.9 U when the residual stream and the final
layer were bfloat16 too, which the 1.5 U bound rejects). The loss averages squared errors over
2,048 values, and the output's errors do not correlate with the residual, so its relative error is
far smaller (measured 5e-6 to 3e-5; bound 1e-3). Gradients pass through the same matmuls
backwards: cosine 1 - 2e-6 to 1 - 6e-6 measured, bound 0.999. Four guided sampling steps: 0.4-0.6 U
measured (1.4-2.6 U with the bfloat16 residual stream and final layer), bound U.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import data, models
from dit_jax.conditioning import build_conditioner, split_batch
from dit_jax.config_defaults import base_config
from dit_jax.diffusion import build_diffusion
from dit_jax.diffusion.guidance import guided
from dit_jax.experiment import step as step_lib
from dit_jax.experiment.state import optimizer
from dit_jax.models import layers

U = 2.0**-8  # bfloat16's unit roundoff.
OUTPUT_RTOL = 1.5 * U  # The model output, relative L2.
SAMPLE_RTOL = U  # Four guided sampling steps, relative L2.
LOSS_RTOL = 1e-3
GRAD_COSINE = 0.999
BATCH = 8
BF16_ALGORITHM = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
TRANSCENDENTAL = ("exp", "log", "log1p", "rsqrt", "sqrt", "sin", "cos", "erf", "erfc")


def _config(kind: str, dtype: str):
  c = base_config()
  c.model.dtype = dtype
  c.train.lr = 1e-3
  c.data.image_size, c.data.channels = 8, 4
  if kind == "dit":
    c.model.variant = "tiny/2"
    c.model.learn_sigma = True  # Exercises the variational bound and the learned variance.
    c.diffusion.objective = "eps"
    c.diffusion.schedule = "linear"
  else:
    c.model.name, c.model.variant = "mmdit", "d2"
    c.model.width, c.model.heads = 64, 2
    c.model.context_len, c.model.context_dim, c.model.pooled_dim = 6, 24, 12
    c.data.name = "synthetic"
    c.diffusion.objective = "rectified_flow"
    c.diffusion.timestep_sampler = "logit_normal"
  return c


@functools.cache
def _parts(kind: str, dtype: str):
  config = _config(kind, dtype)
  spec = data.text_spec(config)
  model = models.build_model(config, spec)
  conditioner = build_conditioner(config, spec)
  diffusion = build_diffusion(config)
  tx = optimizer(config)
  step = functools.partial(
    step_lib.train_step,
    model=model,
    conditioner=conditioner,
    diffusion=diffusion,
    tx=tx,
    lr_fn=lambda s: config.train.lr,
    ema_decay=0.99,
  )
  return model, conditioner, diffusion, tx, jax.jit(step)


def _batch(kind: str, seed: int = 0) -> dict[str, jax.Array]:
  model, conditioner, *_ = _parts(kind, "float32")
  rng = np.random.default_rng(seed)
  size = model.config.input_size
  batch = {"image": rng.standard_normal((BATCH, size, size, 4)).astype(np.float32)}
  for key, s in conditioner.shapes(BATCH).items():
    if jnp.issubdtype(s.dtype, jnp.integer):
      batch[key] = rng.integers(0, 10, s.shape).astype(s.dtype)
    else:
      batch[key] = rng.standard_normal(s.shape).astype(s.dtype)
  return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.cache
def _state(kind: str):
  """The float32 initial state, with every parameter perturbed: a fresh adaLN-Zero model outputs
  exactly zero in any dtype, which would compare nothing."""
  model, conditioner, _, tx, _ = _parts(kind, "float32")

  @jax.jit
  def perturbed():
    inputs = step_lib.dummy_inputs(model, conditioner)
    params = nn.meta.unbox(model.init(jax.random.key(0), *inputs)["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return step_lib.init_state(jax.tree.unflatten(tree, noisy), tx, jax.random.key(2))

  return perturbed()


@functools.cache
def _probe(kind: str, dtype: str) -> dict:
  """From the shared state and batch, in one program: the loss and its gradient (as the train
  step computes them, without label dropout), the model output at mid noise, and a short guided
  sampling trajectory."""
  model, conditioner, diffusion, _, _ = _parts(kind, dtype)
  images, cond = split_batch(_batch(kind))

  @jax.jit
  def run(params):
    def apply(z, t, c):
      return model.apply({"params": params}, z, t, c)

    def loss_fn(p):
      loss, _ = diffusion.training_loss(
        lambda z, t: model.apply({"params": p}, z, t, cond), images, jax.random.key(3)
      )
      return jnp.mean(loss)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    t = diffusion.schedule.model_time(diffusion.schedule.from_unit(jnp.full((BATCH,), 0.5)))
    out = apply(images, t, cond)
    denoise = guided(apply, cond, conditioner.null(cond), 4.0, images.shape[-1])
    sampler = "ddpm" if kind == "dit" else "euler"
    noise = jax.random.normal(jax.random.key(4), images.shape)
    sample = diffusion.sample(denoise, noise, sampler=sampler, num_steps=4, rng=jax.random.key(5))
    return dict(loss=loss, grads=grads, out=out, sample=sample)

  return run(_state(kind).params)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.integration  # bfloat16 compiles slowly on CPU.
@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_bfloat16_tracks_float32_from_the_same_state(kind):
  f32, bf16 = _probe(kind, "float32"), _probe(kind, "bfloat16")
  assert f32["out"].dtype == bf16["out"].dtype == bf16["loss"].dtype == jnp.float32
  # The comparison is not vacuous: bfloat16 changes the numbers, by about its roundoff.
  assert 0 < _rel(f32["out"], bf16["out"]) < OUTPUT_RTOL, _rel(f32["out"], bf16["out"])
  loss32, loss16 = float(f32["loss"]), float(bf16["loss"])
  assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss32, loss16)
  g32, g16 = _flat(f32["grads"]), _flat(bf16["grads"])
  cosine = float(g32 @ g16 / np.linalg.norm(g32) / np.linalg.norm(g16))
  assert cosine > GRAD_COSINE, cosine
  assert np.all(np.isfinite(bf16["sample"]))
  assert _rel(f32["sample"], bf16["sample"]) < SAMPLE_RTOL, _rel(f32["sample"], bf16["sample"])


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_bfloat16_state_stays_float32(kind):
  model, conditioner, _, tx, step = _parts(kind, "bfloat16")
  boxed = jax.eval_shape(step_lib.make_init_fn(model, conditioner, tx, seed=0))
  new, metrics = jax.eval_shape(step, _state(kind), _batch(kind))
  for name, tree in [("init", nn.meta.unbox(boxed)), ("after a step", new)]:
    for part in ("params", "opt_state", "ema_params"):
      dtypes = {x.dtype for x in jax.tree.leaves(getattr(tree, part))}
      assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, (name, part, dtypes)
  assert metrics["loss"].dtype == jnp.float32


def _equations(jaxpr, times=1):
  """Every equation of `jaxpr` with its nested jaxprs (scan bodies counted `length` times)."""
  for eqn in jaxpr.eqns:
    yield eqn, times
    inner = times * eqn.params.get("length", 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub, inner)


def _dot_flops(eqn) -> int:
  (contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))


@pytest.mark.parametrize("kind", ["dit", "mmdit"])
def test_bfloat16_matmuls_with_float32_statistics(kind):
  """Forward and backward: nearly all matmul FLOPs take bfloat16 operands (the exceptions, by
  design, are the final layer's: under 5% of these tiny models, about 0.01% of DiT-XL/2); every
  exponential, logarithm, reciprocal square root and sinusoid runs in float32, and so does every
  reduction (norm statistics, softmax, loss, the biases' gradients summed over the batch) but the
  gradients of the adaLN shift, scale and gate, summed over the tokens of one example."""
  model, _, diffusion, _, _ = _parts(kind, "bfloat16")
  images, cond = split_batch(_batch(kind))

  def loss_fn(p):
    loss, _ = diffusion.training_loss(
      lambda z, t: model.apply({"params": p}, z, t, cond), images, jax.random.key(3)
    )
    return jnp.mean(loss)

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss_fn))(_state(kind).params).jaxpr
  flops = {"bfloat16": 0, "float32": 0}
  f32_only = set()
  for eqn, times in _equations(jaxpr):
    name = eqn.primitive.name
    if name == "dot_general":
      dtypes = {str(v.aval.dtype) for v in eqn.invars}
      # The attention logits' backward multiplies a float32 cotangent by bfloat16 keys or
      # queries with the algorithm that rounds both operands to bfloat16.
      bf16 = dtypes == {"bfloat16"} or eqn.params["precision"] == BF16_ALGORITHM
      assert bf16 or dtypes == {"float32"}, dtypes
      flops["bfloat16" if bf16 else "float32"] += times * _dot_flops(eqn)
    elif name.startswith("reduce_") or name in TRANSCENDENTAL:
      operand = eqn.invars[0].aval
      over_tokens = name == "reduce_sum" and operand.ndim == 3 and eqn.params["axes"] == (1,)
      if not over_tokens:  # [B, L, D] -> [B, D]
        f32_only.add((name, str(operand.dtype)))
  assert flops["bfloat16"] >= 0.95 * (flops["bfloat16"] + flops["float32"]), flops
  assert {"reduce_sum", "reduce_max", "exp", "rsqrt", "cos"} <= {n for n, _ in f32_only}, f32_only
  assert {dtype for _, dtype in f32_only} == {"float32"}, f32_only


def test_layer_norm_statistics_are_float32():
  """A bfloat16 layer norm equals the float32 one on the same inputs, rounded once at the end,
  even where a bfloat16 mean and variance would cancel (a large offset over a small spread)."""
  x = 64.0 + jax.random.normal(jax.random.key(0), (4, 256))
  x16 = x.astype(jnp.bfloat16)
  norm16, norm32 = layers.layer_norm(False, jnp.bfloat16), layers.layer_norm(False, jnp.float32)
  out16 = norm16.apply({}, x16)
  want = norm32.apply({}, x16.astype(jnp.float32)).astype(jnp.bfloat16)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(want, np.float32), atol=U)


@pytest.mark.integration
def test_bfloat16_training_lowers_the_loss_like_float32():
  """The real train step, 40 times on one tiny batch from the same state: the first steps' losses
  agree, and the bfloat16 run learns as fast as the float32 run."""
  batch = _batch("dit", seed=1)
  curves = {}
  for dtype in ("float32", "bfloat16"):
    step = _parts("dit", dtype)[4]
    state, losses = _state("dit"), []
    for _ in range(40):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    assert int(state.skipped) == 0
    curves[dtype] = np.array(losses)
  f32, bf16 = curves["float32"], curves["bfloat16"]
  assert abs(bf16[0] - f32[0]) <= LOSS_RTOL * abs(f32[0]), (f32[0], bf16[0])
  assert bf16[-8:].mean() < 0.8 * bf16[:8].mean(), bf16
  assert abs(bf16[-8:].mean() - f32[-8:].mean()) < 0.05 * f32[-8:].mean(), curves
