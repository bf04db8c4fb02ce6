"""Where the model, the diffusion math and the optimizer meet: init and the jitted train step."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dit_jax.conditioning import Conditioner, split_batch
from dit_jax.diffusion import Diffusion
from dit_jax.experiment import ema as ema_lib
from dit_jax.experiment.state import TrainState, init_state
from dit_jax.models.classifier import Classifier


def dummy_inputs(model: nn.Module, conditioner: Conditioner, batch: int = 1):
  """Zero inputs (images [B, H, W, C], times [B], conditioning) of the model's shapes."""
  cfg = model.config
  shape = (batch, cfg.input_size, cfg.input_size, cfg.in_channels)
  cond = {k: jnp.zeros(s.shape, s.dtype) for k, s in conditioner.shapes(batch).items()}
  return jnp.zeros(shape, jnp.float32), jnp.zeros((batch,), jnp.float32), cond


def make_init_fn(
  model: nn.Module,
  conditioner: Conditioner,
  tx: optax.GradientTransformation,
  seed: int,
  num_ema: int = 0,
):
  """Returns init() -> TrainState with parameters still boxed with their logical axes (and
  `num_ema` power EMAs, or one exponential EMA if 0).

  Call it under `jax.eval_shape` to read the shapes and axes, and jit it (unboxed) to build the
  state directly in its shardings.
  """

  def init() -> TrainState:
    key = jax.random.key(seed)
    inputs = dummy_inputs(model, conditioner)
    params = model.init({"params": jax.random.fold_in(key, 0)}, *inputs)["params"]
    return init_state(params, tx, jax.random.fold_in(key, 1), num_ema)

  return init


def unboxed(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    return nn.meta.unbox(fn(*args, **kwargs))

  return wrapper


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  conditioner: Conditioner,
  diffusion: Diffusion,
  tx: optax.GradientTransformation,
  lr_fn: optax.Schedule,
  ema_decay: float,
  ema_gammas: tuple[float, ...] = (),
) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer update on a global batch {"image": [B, H, W, C], **conditioning}."""
  key_drop, key_loss = jax.random.split(state.step_key())
  images, cond = split_batch(batch)
  # The time shift of this batch's size (aspect-ratio buckets; the same diffusion otherwise).
  diffusion = diffusion.at_size(*images.shape[1:3])
  cond = conditioner.drop(cond, key_drop)  # Trains the unconditional model too (guidance).

  def loss_fn(params):
    def denoise(z, t):
      return model.apply({"params": params}, z, t, cond)

    if isinstance(model, Classifier):
      # The batch's own labels are the targets (the classifier ignores `cond`).
      loss, terms = diffusion.classifier_loss(denoise, images, batch["label"], key_loss)
    else:
      loss, terms = diffusion.training_loss(denoise, images, key_loss)
    return jnp.mean(loss), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # One exponential EMA, or one power EMA per exponent in ema_gammas (EDM2); t counts updates.
  ema = ema_lib.update(state.ema_params, params, state.step + 1, decay=ema_decay, gammas=ema_gammas)
  # A non-finite loss or gradient drops the whole update (parameters, optimizer moments, EMA), so
  # the state never holds NaNs; the step counter, data and randomness move on.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    ema_params=keep(ema, state.ema_params),
    skipped=state.skipped + (~finite).astype(jnp.int32),
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "lr": lr_fn(state.step),
    "skipped_steps": new_state.skipped,
    **{k: jnp.mean(v) for k, v in terms.items() if k != "t"},
  }
  return new_state, metrics
