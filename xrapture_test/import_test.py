"""Importing xrapture does no JAX work, so jax.distributed can start afterwards.

``jax.distributed.initialize`` must come before anything initializes an XLA
backend, and a user's script imports its libraries first. Each check runs in
a fresh interpreter.
"""

import os
import sys
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
from xrapture._src.testing import multiprocess

# Imports `MODULE`, then reports whether a backend exists (JAX's private
# registry, where this JAX has it) and whether jax.distributed still starts.
_CHECK = textwrap.dedent("""
    import importlib, sys
    {prelude}
    importlib.import_module("{module}")
    import jax
    try:
      from jax._src import xla_bridge
      backends = sorted(getattr(xla_bridge, "_backends", {{}}))
    except ImportError:
      backends = []
    print("backends:", backends)
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}",
                               num_processes=1, process_id=0,
                               initialization_timeout=30)
    print("devices:", jax.devices())
    jax.distributed.shutdown()
    sys.exit(1 if backends else 0)
""")


def _run(module, prelude=""):
  code = _CHECK.format(module=module, prelude=prelude, port=multiprocess.free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  (result,) = multiprocess.run_group([[sys.executable, "-c", code]], [env],
                                     timeout_s=120)
  return result


class ImportTest(parameterized.TestCase):

  @parameterized.parameters("xrapture", "xrapture.testing")
  def test_import_initializes_no_backend(self, module):
    result = _run(module)
    self.assertEqual(result.returncode, 0, result.output)
    self.assertIn("backends: []", result.output)
    self.assertIn("devices: [", result.output)

  def test_the_check_sees_a_backend(self):
    # Positive control: an array made at import time is caught.
    result = _run("xrapture", prelude="import jax.numpy; jax.numpy.zeros(1)")
    self.assertNotEqual(result.returncode, 0, result.output)
    self.assertIn("initialize", result.output)  # jax.distributed refuses


if __name__ == "__main__":
  absltest.main()
