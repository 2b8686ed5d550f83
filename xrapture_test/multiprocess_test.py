"""The multi-process test runner: deadlines, and no worker outlives a failure."""

import socket
import sys

from absl.testing import absltest
from xrapture._src.testing import multiprocess


def _python(code):
  return [sys.executable, "-c", code]


class RunGroupTest(absltest.TestCase):

  def test_outputs_and_exit_statuses(self):
    results = multiprocess.run_group(
        [_python("print('hello')"), _python("import sys; print('bye'); sys.exit(3)")],
        [{}, {}], timeout_s=60)
    self.assertEqual([r.returncode for r in results], [0, 3])
    self.assertEqual([r.output.strip() for r in results], ["hello", "bye"])
    self.assertFalse(any(r.killed for r in results))
    with self.assertRaisesRegex(AssertionError, "(?s)process 1: exit status 3.*bye"):
      multiprocess.check(results)
    multiprocess.check(results[:1])

  def test_a_failure_ends_the_others_after_the_grace_period(self):
    results = multiprocess.run_group(
        [_python("import time; time.sleep(300)"), _python("import sys; sys.exit(1)")],
        [{}, {}], timeout_s=300, grace_s=0.5)
    self.assertTrue(results[0].killed)
    self.assertLess(results[0].seconds, 60)
    self.assertEqual(results[1].returncode, 1)

  def test_deadline_kills_what_is_left(self):
    (result,) = multiprocess.run_group(
        [_python("import time; print('started', flush=True); time.sleep(300)")],
        [{}], timeout_s=3)
    self.assertTrue(result.killed)
    self.assertIn("started", result.output)
    self.assertIn("killed", multiprocess.describe([result]))

  def test_free_port_can_be_bound(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", multiprocess.free_port()))


if __name__ == "__main__":
  absltest.main()
