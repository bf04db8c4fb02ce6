"""The one train state pytree and the optimizer that updates it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dit_jax.errors import ConfigError, check_choice
from dit_jax.train import ema


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far.
  params: Any
  opt_state: Any
  # One exponential EMA (a tree like params), or a tuple of power EMAs, one per train.ema.std.
  ema_params: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step).
  skipped: jax.Array  # int32 scalar: steps whose update was dropped (non-finite loss/gradient).

  def step_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  check_choice(t.lr_schedule, ("constant", "cosine"), "train.lr_schedule")
  if t.lr <= 0:
    raise ConfigError(f"config.train.lr={t.lr} must be > 0.")
  warmup = max(int(t.warmup_steps), 0)
  if t.lr_schedule == "constant":
    after = optax.constant_schedule(t.lr)
  else:
    after = optax.cosine_decay_schedule(t.lr, max(t.num_steps - warmup, 1))
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), after], [warmup])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with warmup and global-norm clipping (DiT: lr 1e-4, no weight decay)."""
  t = config.train
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate(config), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
  return optax.chain(*parts)


def init_state(
  params: Any, tx: optax.GradientTransformation, seed_key: jax.Array, num_ema: int = 0
) -> TrainState:
  """The state at step 0; `num_ema` > 0 power EMAs (a tuple), else one exponential EMA."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=ema.init(params, num_ema),
    rng=jax.random.key_data(seed_key),
    skipped=jnp.zeros((), jnp.int32),
  )
