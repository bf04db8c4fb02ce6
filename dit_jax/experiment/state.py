"""The one train state pytree and the optimizer that updates it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dit_jax.errors import check_choice, check_numbers
from dit_jax.experiment import ema


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


# What each number of config.train that the state, its optimizer and its step read accepts (see
# errors.check_numbers); the loop's own are checked by dit_jax.train.loop.
NUMBERS = (
  ("train.batch_size", "> 0", ""),
  ("train.seed", "in [0, 2**32)", ""),
  ("train.lr", "> 0", ""),
  ("train.warmup_steps", ">= 0", ""),
  ("train.weight_decay", ">= 0", ""),
  ("train.b1", "in [0, 1)", " (Adam's decay rate of the gradient's mean)"),
  ("train.b2", "in [0, 1)", " (Adam's decay rate of the squared gradient's mean)"),
  ("train.grad_clip", ">= 0", " (0 = no clipping)"),
  ("train.ema_decay", "in [0, 1)", ""),
)
LR_SCHEDULES = ("constant", "cosine")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for an optimizer or state field of config.train that cannot work."""
  check_numbers(config, NUMBERS)
  check_choice(config.train.lr_schedule, LR_SCHEDULES, "train.lr_schedule")


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  t = config.train
  check_config(config)
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
