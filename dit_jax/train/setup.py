"""Builds every part a config selects, validated up front; shared by training, sampling,
evaluation and benchmarks so that they all run exactly the same model and step."""

import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dit_jax import data, models, parallel
from dit_jax import diffusion as diffusion_lib
from dit_jax.conditioning import Conditioner, build_conditioner
from dit_jax.errors import ConfigError, check_choice
from dit_jax.train import step as step_lib
from dit_jax.train.state import TrainState, learning_rate, optimizer


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  model: nn.Module
  conditioner: Conditioner
  diffusion: diffusion_lib.Diffusion
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  mesh: Mesh
  rules: tuple
  abstract_state: TrainState  # Shapes, unboxed, each leaf carrying its sharding.
  state_shardings: TrainState

  @property
  def param_shardings(self) -> Any:
    return self.state_shardings.params

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical-axis rules that tracing the model needs; wrap calls of jitted steps.

    The mesh must be set with `jax.set_mesh`: Flax applies the models' activation constraints
    only under an (abstract) mesh, and silently skips them otherwise.
    """
    with mesh_context(self.mesh, self.rules):
      yield

  def init_state(self) -> TrainState:
    """Builds the train state directly in its shardings (no host-side copy)."""
    init = step_lib.unboxed(
      step_lib.make_init_fn(self.model, self.conditioner, self.tx, self.config.train.seed)
    )
    with self.context():
      return jax.jit(init, out_shardings=self.state_shardings)()

  def jit_train_step(self):
    """The train step, jitted with explicit shardings; the input state is donated. Call it
    within `self.context()`."""
    fn = functools.partial(
      step_lib.train_step,
      model=self.model,
      conditioner=self.conditioner,
      diffusion=self.diffusion,
      tx=self.tx,
      lr_fn=self.lr_fn,
      ema_decay=self.config.train.ema_decay,
    )
    return jax.jit(
      fn,
      in_shardings=(self.state_shardings, parallel.batch_sharding(self.mesh)),
      out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
      donate_argnums=(0,),
    )

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global training batch, sharded over the data axes."""
    b = self.config.train.batch_size if batch_size is None else batch_size
    d = self.config.data
    sharding = parallel.batch_sharding(self.mesh)
    cond = {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
      for k, s in self.conditioner.shapes(b).items()
    }
    image = jax.ShapeDtypeStruct(
      (b, d.image_size, d.image_size, d.channels), jnp.float32, sharding=sharding
    )
    return {"image": image, **cond}


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the names and numbers in `config` that need no devices or data."""
  t = config.train
  for field in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if t[field] <= 0:
      raise ConfigError(f"config.train.{field}={t[field]} must be > 0.")
  check_choice(t.nonfinite, ("stop", "skip"), "train.nonfinite")
  if t.keep_every < 0:
    raise ConfigError(f"config.train.keep_every={t.keep_every} must be >= 0 (0 = off).")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ConfigError(f"config.train.ema_decay={t.ema_decay} must be in [0, 1).")
  check_choice(config.sample.labels, ("balanced", "random"), "sample.labels")
  if config.sample.num_images <= 0 or config.sample.batch_size <= 0:
    raise ConfigError("config.sample.num_images and config.sample.batch_size must be > 0.")
  if config.model.num_classes <= 0:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} must be > 0.")
  diffusion_lib.resolve_sampler(config)


def build(config: ml_collections.ConfigDict, devices=None, *, training: bool = True) -> Experiment:
  """Validates `config` and builds the model, diffusion, optimizer, mesh and state layout.

  `training=False` (sampling, evaluation, imports) skips the check that train.batch_size divides
  over the devices, so that a checkpoint restores onto any number of them.
  """
  validate(config)
  text_spec = data.text_spec(config)
  conditioner = build_conditioner(config, text_spec)
  model = models.build_model(config, text_spec)
  diff = diffusion_lib.build_diffusion(config)
  tx = optimizer(config)
  mesh = parallel.make_mesh(config, devices)
  if training:
    parallel.check_batch_size(config.train.batch_size, mesh)
  rules = parallel.axis_rules(config)
  init = step_lib.make_init_fn(model, conditioner, tx, config.train.seed)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  return Experiment(
    config, model, conditioner, diff, tx, learning_rate(config), mesh, rules, abstract, shardings
  )
