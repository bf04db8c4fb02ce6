"""dit_jax: a JAX/Flax training framework for Diffusion Transformers."""

from setuptools import find_packages, setup

setup(
  name="dit_jax",
  version="0.1.0",
  description="JAX/Flax, TPU-first training framework for Diffusion Transformers (DiT, MMDiT).",
  packages=find_packages(include=["dit_jax", "dit_jax.*"]),
  package_data={"dit_jax.evaluation": ["assets/*.npz"]},
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.10",
    "grain>=0.2.10",
    "tensorflow-datasets>=4.9.7",
    "ml_collections>=0.1.1",
    "absl-py",
    "numpy",
    "scikit-learn",  # ships the built-in `digits` dataset
    "scipy",
    "Pillow",
    "tqdm",
    "tensorboardX",
  ],
  extras_require={
    "test": ["pytest", "ruff"],
    # Cloud TPU VMs, and the ahead-of-time fit check (launch/aot_compile.py) on any machine:
    # the libtpu that matches the installed jax.
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda12]"],
  },
)
