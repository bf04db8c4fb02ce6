"""dit_jax: a JAX/Flax training framework for Diffusion Transformers."""

from setuptools import find_packages, setup

setup(
  name="dit_jax",
  version="0.1.0",
  description="JAX/Flax, TPU-first training framework for Diffusion Transformers (DiT, MMDiT).",
  packages=find_packages(include=["dit_jax", "dit_jax.*"]),
  package_data={"dit_jax.models": ["assets/*.npz"]},
  # jax.set_mesh came in jax 0.7.1, and jax >= 0.7 needs Python 3.11 (on 3.10 pip picks jax
  # 0.6.2, which lacks it).
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.7.1",
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
    "tensorboard",  # writes WORKDIR/tensorboard and views it: tensorboard --logdir ...
    "safetensors",  # reads diffusers checkpoints (dit_jax.models.convert)
  ],
  extras_require={
    # Parity tests against diffusers (PyTorch on CPU) and the text-encoder tool's tests.
    "test": [
      "pytest",
      "pytest-xdist",
      "filelock",  # Fixtures that pytest-xdist's workers share (tests/conftest.py).
      "gcsfs",  # gs:// workdirs and data, tested against a local GCS emulator:
      "gcp-storage-emulator",
      "ruff",
      "torch==2.13.0",
      "diffusers",
      "transformers",
    ],
    # dit_jax.tools.encode_text: the Hugging Face tokenizers of CLIP and T5 (the Flax encoders
    # read the safetensors themselves; --backend=torch also needs torch).
    "text": ["transformers"],
    # Cloud TPU VMs, and the ahead-of-time fit check (launch/aot_compile.py) on any machine:
    # the libtpu that matches the installed jax.
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda12]"],
    # gs:// paths (workdirs, data, weights): gcsfs under etils epath; Orbax's tensorstore has GCS.
    "gcs": ["gcsfs"],
  },
)
