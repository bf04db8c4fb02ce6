"""Guidance: how a sampler steers a conditional network, as wrappers around `apply`.

- Classifier-free guidance (Ho & Salimans 2022): uncond + w (cond - uncond).
- Guidance interval (Kynkäänniemi et al. 2024): that mix only at noise levels in (lo, hi]; outside
  it the conditional pass alone (scale 1), so the unconditional pass is skipped there.
- CADS (Sadat et al. 2024): the condition the network sees is annealed from noise at high noise
  levels to itself at low ones, y' = sqrt(gamma(u)) y + s sqrt(1 - gamma(u)) n, optionally
  rescaled to y's mean and standard deviation and mixed back by psi.
- Autoguidance (Karras et al. 2024): the unconditional pass is replaced by a weaker model's
  conditional one, D_guide + w (D_main - D_guide).
- Classifier guidance (Dhariwal & Nichol 2021) acts on the sampler's mean or score, not on the
  network output; see `Diffusion.sample(classifier_grad=...)`.

The functions here see arrays and closures only: the model, its parameters and the config are
the caller's (`dit_jax.evaluation.sampling`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# apply(z [B, ...], model_time [B], cond[, perturb]) -> output; perturb maps the condition the
# network sees (a label embedding, or the text pytree). It is passed only when there is one, so a
# plain apply(z, t, cond) serves wherever CADS is off.
Apply = Callable[..., jax.Array]


def _call(apply: Apply, z, t, cond, perturb):
  return apply(z, t, cond) if perturb is None else apply(z, t, cond, perturb)


def classifier_free_guidance(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
  """uncond + scale * (cond - uncond), written so that scale = 1 returns `cond` exactly."""
  return cond + (scale - 1.0) * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class CADS:
  """Condition-annealed diffusion sampling: the schedule gamma(u) and the perturbation.

  u in [0, 1] is the diffusion time with u = 1 pure noise (VP: t / T; rectified flow: t).
  gamma(u) = 1 for u <= tau1 (the condition as it is), 0 for u >= tau2 (noise only, scaled by
  `noise_scale`), linear between.
  """

  noise_scale: float
  tau1: float = 0.6
  tau2: float = 0.9
  psi: float = 1.0
  rescale: bool = True

  def gamma(self, u: jax.Array) -> jax.Array:
    ramp = jnp.clip((self.tau2 - u) / (self.tau2 - self.tau1), 0.0, 1.0)
    return jnp.where(u <= self.tau1, 1.0, jnp.where(u >= self.tau2, 0.0, ramp))  # Exact ends.

  def perturb(self, y: jax.Array, u: jax.Array, noise: jax.Array) -> jax.Array:
    """y [B, ...] at time u (a scalar) with standard normal `noise` like y; y itself (bitwise)
    where gamma = 1. The rescaling matches each row's mean and standard deviation over its
    non-batch axes to y's, then mixes psi of it with 1 - psi of the unscaled perturbation."""
    g = self.gamma(u)
    y32 = y.astype(jnp.float32)
    out = jnp.sqrt(g) * y32 + self.noise_scale * jnp.sqrt(1.0 - g) * noise
    if self.rescale:
      axes = tuple(range(1, y.ndim))
      mean_in, std_in = jnp.mean(y32, axes, keepdims=True), jnp.std(y32, axes, keepdims=True)
      mean, std = jnp.mean(out, axes, keepdims=True), jnp.std(out, axes, keepdims=True)
      rescaled = (out - mean) / jnp.maximum(std, 1e-12) * std_in + mean_in
      out = self.psi * rescaled + (1.0 - self.psi) * out
    return jnp.where(g >= 1.0, y32, out).astype(y.dtype)


def cads_perturbation(
  cads: CADS, unit_time: jax.Array, row_keys: jax.Array, model_time: jax.Array
) -> Callable[[Any], Any]:
  """The perturbation of a condition pytree (rows = samples) at one solver evaluation.

  Sample i's noise depends on its own key `row_keys[i]` (derived from the seed and the sample's
  index), the evaluation's time and the leaf, so it is the same in any batch and on any mesh.
  """
  time_code = jax.lax.bitcast_convert_type(model_time.astype(jnp.float32), jnp.int32)

  def perturb(tree):
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for n, leaf in enumerate(leaves):

      def row_noise(k, n=n, leaf=leaf):
        return jax.random.normal(
          jax.random.fold_in(jax.random.fold_in(k, time_code), n), leaf.shape[1:]
        )

      out.append(cads.perturb(leaf, unit_time, jax.vmap(row_noise)(row_keys)))
    return jax.tree.unflatten(treedef, out)

  return perturb


def _first_rows(perturb: Callable | None, b: int) -> Callable | None:
  """`perturb` applied to the first b rows of each leaf only (the conditional half of a batch
  that stacks [conditional; unconditional])."""
  if perturb is None:
    return None

  def apply(tree):
    head = perturb(jax.tree.map(lambda x: x[:b], tree))
    return jax.tree.map(lambda h, x: jnp.concatenate([h, x[b:]]), head, tree)

  return apply


def guided(
  apply: Apply,
  cond: Any,
  null_cond: Any,
  scale: float,
  guided_channels: int,
  *,
  in_interval: Callable[[jax.Array], jax.Array] | None = None,
  perturbation: Callable[[jax.Array], Callable] | None = None,
  guide_apply: Apply | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns denoise(z, t) that guides apply(z, t, cond) by `scale`.

  `cond` and `null_cond` are pytrees of arrays with a leading batch axis (class labels, text
  embeddings); the conditional and unconditional passes share one batched call. Only the first
  `guided_channels` output channels (the mean prediction) are guided; any further channels (a
  learned variance) come from the conditional pass.

  Args:
    in_interval: model_time (a scalar) -> whether to guide there; elsewhere only the conditional
      pass runs (`lax.cond`). None: guide at every evaluation.
    perturbation: model_time (a scalar) -> the map applied to the condition the network sees
      (CADS), for the conditional pass only. None: the condition as it is.
    guide_apply: the weaker model of autoguidance, called with the main model's (perturbed)
      condition in place of the unconditional pass.
  """

  def perturb_at(t):
    return None if perturbation is None else perturbation(t[0])

  def conditional(z, t):
    return _call(apply, z, t, cond, perturb_at(t))

  if scale == 1.0:
    return conditional

  def mix(cond_out, uncond_out):
    n = guided_channels
    mean = classifier_free_guidance(cond_out[..., :n], uncond_out[..., :n], scale)
    return jnp.concatenate([mean, cond_out[..., n:]], axis=-1)

  if guide_apply is not None:

    def guided_pass(z, t):
      perturb = perturb_at(t)
      return mix(_call(apply, z, t, cond, perturb), _call(guide_apply, z, t, cond, perturb))
  else:
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null_cond)

    def guided_pass(z, t):
      b = z.shape[0]
      doubled = jnp.concatenate([z, z]), jnp.concatenate([t, t])
      out = _call(apply, *doubled, both, _first_rows(perturb_at(t), b))
      return mix(out[:b], out[b:])

  if in_interval is None:
    return guided_pass
  return lambda z, t: jax.lax.cond(in_interval(t[0]), guided_pass, conditional, z, t)
