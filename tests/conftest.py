"""Every test runs with 8 fake CPU devices, as a small pod would have."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Where libtpu is installed (for the ahead-of-time compile test) no TPU is used: let processes
# load it side by side instead of locking it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
