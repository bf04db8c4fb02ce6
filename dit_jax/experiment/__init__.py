"""What a config describes, built: the model, conditioning, diffusion, optimizer, mesh, the train
state's layout and the jitted step. Below both the training loop and evaluation, which share it
with the benchmarks and ahead-of-time compilation, so that they all run exactly the same model
and step."""

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
from dit_jax.conditioning import Conditioner, LabelConditioner, build_conditioner
from dit_jax.experiment import ema as ema_lib
from dit_jax.experiment import state as state_lib
from dit_jax.experiment import step as step_lib
from dit_jax.experiment import validation
from dit_jax.experiment.state import TrainState, learning_rate, optimizer
from dit_jax.models import attention


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
  # The jitted train step, made on first use: one jit per experiment, so a second call of
  # jit_train_step() is served by its trace and compile caches.
  _train_step: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

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
      step_lib.make_init_fn(
        self.model,
        self.conditioner,
        self.tx,
        self.config.train.seed,
        len(ema_lib.gammas(self.config)),
      )
    )
    with self.context():
      return jax.jit(init, out_shardings=self.state_shardings)()

  def jit_train_step(self):
    """The train step, jitted with explicit shardings (once per experiment); the input state is
    donated. Call it within `self.context()`."""
    if self._train_step is not None:
      return self._train_step
    fn = functools.partial(
      step_lib.train_step,
      model=self.model,
      conditioner=self.conditioner,
      diffusion=self.diffusion,
      tx=self.tx,
      lr_fn=self.lr_fn,
      ema_decay=self.config.train.ema_decay,
      ema_gammas=ema_lib.gammas(self.config),
    )
    self._train_step = jax.jit(
      fn,
      in_shardings=(self.state_shardings, parallel.batch_sharding(self.mesh)),
      out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
      donate_argnums=(0,),
    )
    return self._train_step

  def abstract_batch(
    self, batch_size: int | None = None, size: tuple[int, int] | None = None
  ) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global training batch, sharded over the data axes; its images are
    `size` = (height, width) (a bucket of config.data.buckets), by default square of
    config.data.image_size."""
    b = self.config.train.batch_size if batch_size is None else batch_size
    d = self.config.data
    height, width = size or (d.image_size, d.image_size)
    sharding = parallel.batch_sharding(self.mesh)
    cond = {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
      for k, s in self.conditioner.shapes(b).items()
    }
    image = jax.ShapeDtypeStruct((b, height, width, d.channels), jnp.float32, sharding=sharding)
    return {"image": image, **cond}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for a field of the parts `build` makes that cannot work: the model,
  the data's numbers, the diffusion, the optimizer and the EMAs. (`dit_jax.checks.validate`
  checks the whole config: these, the loop's and evaluation's fields.)"""
  # The model's name first: the data's checks read it (e.g. whether the data needs text).
  models.check_config(config)
  data.check_config(config)
  diffusion_lib.check_config(config)
  state_lib.check_config(config)
  ema_lib.check_config(config)
  validation.check_config(config)


def build(config: ml_collections.ConfigDict, devices=None, *, training: bool = True) -> Experiment:
  """Validates `config` and builds the model, diffusion, optimizer, mesh and state layout.

  `training=False` (sampling, evaluation, imports) skips the check that train.batch_size divides
  over the devices, so that a checkpoint restores onto any number of them.
  """
  check_config(config)
  text_spec = data.text_spec(config)
  if config.model.name == "classifier":
    # The labels are the classifier's targets: never dropped to the null class.
    conditioner = LabelConditioner(config.model.num_classes, 0.0)
  else:
    conditioner = build_conditioner(config, text_spec)
  model = models.build_model(config, text_spec)
  diff = diffusion_lib.build_diffusion(config)
  tx = optimizer(config)
  mesh = parallel.make_mesh(config, devices)
  attention.check_platform(config.model.attention, mesh.devices.flat[0].platform)
  if training:
    parallel.check_batch_size(config.train.batch_size, mesh)
  rules = parallel.axis_rules(config)
  num_ema = len(ema_lib.gammas(config))
  init = step_lib.make_init_fn(model, conditioner, tx, config.train.seed, num_ema)
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(init)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  return Experiment(
    config, model, conditioner, diff, tx, learning_rate(config), mesh, rules, abstract, shardings
  )
