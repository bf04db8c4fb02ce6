"""dit_jax: a JAX/Flax, TPU-first training framework for Diffusion Transformers."""

from dit_jax import xla_flags as _xla_flags

_xla_flags.apply()
