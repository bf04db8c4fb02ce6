"""Loaded by every Python subprocess that the test suite starts (conftest.py puts this folder on
PYTHONPATH): it adds the suite's XLA flags to the process's XLA_FLAGS, and where
DIT_JAX_TEST_COMPILE_LOG is set, it adds the XLA compile time of the process to
that log under the test file that started it, so the suite's compile summary counts subprocesses
too. JAX is not imported here: the listener is registered once the program imports JAX itself."""

import os
import sys

# The suite's XLA flags (tests/conftest.py), added to whatever XLA_FLAGS the test set.
_flags = os.environ.get("DIT_JAX_TEST_XLA_FLAGS", "")
if _flags and _flags not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flags}".strip()

# The CPU flags that `import dit_jax` used to add: every program the tests start gets them, as the
# programs do themselves through dit_jax.cli.run.
try:
  from dit_jax import xla_flags as _xla_flags

  _xla_flags.apply()
except ImportError:
  pass

if os.environ.get("DIT_JAX_TEST_COMPILE_LOG"):
  import importlib.abc
  import importlib.util

  class _AfterMonitoring(importlib.abc.MetaPathFinder):
    """Registers the compile listener right after `jax._src.monitoring` is first imported."""

    def find_spec(self, name, path, target=None):
      if name != "jax._src.monitoring":
        return None
      sys.meta_path.remove(self)
      spec = importlib.util.find_spec(name)
      if spec is None or spec.loader is None:
        return spec
      run_module = spec.loader.exec_module

      def exec_module(module):
        run_module(module)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
          import _compile_log

          _compile_log.listen(module)
        finally:
          sys.path.pop(0)

      spec.loader.exec_module = exec_module
      return spec

  sys.meta_path.insert(0, _AfterMonitoring())
