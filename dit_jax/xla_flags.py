"""XLA CPU flags that make dit_jax's programs faster on CPUs, added to XLA_FLAGS by `apply`.

XLA reads XLA_FLAGS once, when the first JAX backend starts, so `apply` must come before the first
JAX computation: every program calls it as it starts (`dit_jax.cli.run`), before parsing its
flags; importing the package does not. The flags choose the library that runs matrix products on
the CPU backend:

- `--xla_cpu_experimental_ynn_fusion_type=` turns off YNNPACK's dot fusions, which jaxlib 0.10
  uses by default and which ran DiT's products at 70-150 GFLOP/s here (the transposed products
  of the backward pass and the attention's batched products slowest);
- `--xla_cpu_experimental_xnn_fusion_type=dot` runs the products through XNNPACK instead.

Measured with `python -m dit_jax.benchmark` on a 2-core AMD EPYC (AVX-512) for DiT-S/2, batch 32,
float32: train step 14.9 s -> 12.9 s, guided sampling step 7.6 s -> 5.2 s. The flags touch only
the CPU backend (TPU and GPU programs are unchanged) and only products' summation order.

They are added only for the jaxlib versions they were tested with (XLA stops the process on a
flag it does not know), never when XLA_FLAGS already names them, and not at all when the
environment sets DIT_JAX_XLA_CPU_FLAGS=0.
"""

import os

CPU_FLAGS = (
  "--xla_cpu_experimental_ynn_fusion_type=",
  "--xla_cpu_experimental_xnn_fusion_type=dot",
)
# jaxlib major.minor versions whose XLA knows CPU_FLAGS (and was measured with them).
TESTED_JAXLIB = ("0.10",)


def _jaxlib_version() -> str | None:
  try:
    from importlib import metadata

    return metadata.version("jaxlib")
  except Exception:  # noqa: BLE001 - no jaxlib metadata: add nothing.
    return None


def flags_to_add(xla_flags: str, jaxlib_version: str | None, opt_out: str | None) -> list[str]:
  """The CPU_FLAGS missing from `xla_flags` when they apply (see the module docstring)."""
  if opt_out == "0" or jaxlib_version is None:
    return []
  if ".".join(jaxlib_version.split(".")[:2]) not in TESTED_JAXLIB:
    return []
  present = {f.split("=", 1)[0] for f in xla_flags.split()}
  return [f for f in CPU_FLAGS if f.split("=", 1)[0] not in present]


def apply() -> None:
  """Appends the flags to os.environ["XLA_FLAGS"] (before JAX starts a backend)."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = flags_to_add(current, _jaxlib_version(), os.environ.get("DIT_JAX_XLA_CPU_FLAGS"))
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
