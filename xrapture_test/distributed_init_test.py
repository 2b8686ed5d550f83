"""Joining a multi-process run with bad input ends in a clear error, in bounded time.

xrapture/_src/distributed.py. The workers are this file, run as a script
with ``XRAPTURE_TEST_WORKER`` set: each imports xrapture first (as a user's
script does), then tries to join.
"""

import os
import sys

from absl.testing import absltest
from xrapture._src import distributed
from xrapture._src.testing import multiprocess

import test_utils

# Seconds a worker waits for the others; the group's deadline is far above.
_JOIN_S = 3
_DEADLINE_S = 120


def _worker_main():
  # Unused on purpose: imported before jax, as a user's script does.
  import xrapture  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  address = env["XRAPTURE_TEST_COORDINATOR"]
  n, pid = int(env["XRAPTURE_TEST_NUM_PROCESSES"]), int(env["XRAPTURE_TEST_PROCESS_ID"])
  if env["XRAPTURE_TEST_WORKER"] == "jax":  # JAX's own call, no checks
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, n, pid, initialization_timeout=_JOIN_S)
  else:
    distributed.initialize(address, n, pid, timeout_s=_JOIN_S)
  print(f"joined: process {jax.process_index()} of {jax.process_count()}", flush=True)
  if env["XRAPTURE_TEST_WORKER"] == "cache":
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gathered = multihost_utils.process_allgather(np.asarray([pid + 1]))
    print(f"cache on: {jax.config.jax_enable_compilation_cache}; "
          f"gathered: {np.asarray(gathered).ravel().tolist()}", flush=True)


def _run(specs, extra=None):
  """Runs one worker per ``(kind, num_processes, process_id)``, on one port."""
  port = multiprocess.free_port()
  envs = [multiprocess.worker_env(pid, n, port, local_devices=1,
                                  extra={"XRAPTURE_TEST_WORKER": kind, **(extra or {})})
          for kind, n, pid in specs]
  argv = multiprocess.python_command(os.path.abspath(__file__))
  return port, multiprocess.run_group([argv] * len(specs), envs,
                                      timeout_s=_DEADLINE_S, grace_s=_DEADLINE_S)


class InitializeTest(absltest.TestCase):

  def test_coordinator_that_never_answers(self):
    # Nobody listens on the port: ours raises, JAX's own call aborts; both end.
    port, (ours, theirs) = _run([("ours", 2, 1), ("jax", 2, 1)])
    for result in (ours, theirs):
      self.assertFalse(result.killed, multiprocess.describe([result]))
      self.assertNotEqual(result.returncode, 0, result.output)
      self.assertNotIn("joined", result.output)
    self.assertIn(f"TimeoutError: no coordinator answers at 127.0.0.1:{port}", ours.output)
    self.assertIn("start process 0", ours.output)

  def test_mismatched_process_counts(self):
    # Process 1 believes in 3 processes; the coordinator runs 2.
    _, (zero, one) = _run([("ours", 2, 0), ("ours", 3, 1)])
    self.assertFalse(one.killed or zero.killed, multiprocess.describe([zero, one]))
    self.assertNotEqual(one.returncode, 0, one.output)
    self.assertIn("ValueError: process 1 was started with num_processes=3, but the "
                  "coordinator at", one.output)
    self.assertIn("runs 2 processes: give every process the same num_processes",
                  one.output)

  def test_matching_processes_join(self):
    # Positive control for the two above.
    _, results = _run([("ours", 2, 0), ("ours", 2, 1)])
    multiprocess.check(results)
    self.assertIn("joined: process 0 of 2", results[0].output)
    self.assertIn("joined: process 1 of 2", results[1].output)

  def test_the_compilation_cache_cannot_hang_a_cpu_run(self):
    # With the persistent cache on, jax >= 0.11 hangs a multi-process CPU
    # run in programs loaded from it: initialize turns the cache off there
    # (and says so), and leaves it on where it works. Twice, so that the
    # second group would find what the first wrote.
    hangs = distributed._version() >= distributed._CACHE_HANG_SINCE
    cache = test_utils.tmpdir(self)
    for _ in range(2):
      _, results = _run([("cache", 2, 0), ("cache", 2, 1)], extra={
          "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
      multiprocess.check(results)
      for result in results:
        self.assertIn(f"cache on: {not hangs}; gathered: [1, 2]", result.output)
        self.assertEqual("persistent compilation cache" in result.output, hangs,
                         result.output)

  def test_bad_arguments_fail_before_joining(self):
    with self.assertRaisesRegex(ValueError, r"process_id=2 is outside \[0, num_processes=2\)"):
      distributed.initialize("127.0.0.1:1", 2, 2)
    with self.assertRaisesRegex(ValueError, "is not 'host:port'"):
      distributed.initialize("localhost", 2, 1)


# Run as a worker (see the module docstring), or as the test.
if __name__ == "__main__" and os.environ.get("XRAPTURE_TEST_WORKER"):
  sys.exit(_worker_main())

if __name__ == "__main__":
  absltest.main()
