"""dit_jax: a JAX/Flax, TPU-first training framework for Diffusion Transformers.

Importing it changes nothing in the process: the programs (`dit_jax.cli.run`) add the XLA CPU
flags of `dit_jax.xla_flags`; a notebook or script of your own calls `dit_jax.xla_flags.apply()`
before its first JAX computation to get them.
"""
