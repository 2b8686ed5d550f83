"""CONTRIBUTING.md's worked example (a reduce_sum handler and its test) works as written."""

import pathlib
import re
import unittest

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

import xrapture
from xrapture._src.implicit import registry

# A code block of CONTRIBUTING.md that stands for a file, and the file's path.
_FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```python\n(.*?)```", re.S)
_HANDLER = "xrapture/_src/lora/reduce.py"
_TEST = "xrapture_test/reduce_test.py"


def _files() -> dict[str, str]:
  here = pathlib.Path(__file__).resolve().parent
  for candidate in (here.parent / "CONTRIBUTING.md", here / ".." / "CONTRIBUTING.md"):
    if candidate.exists():
      return dict(_FILE_BLOCK.findall(candidate.read_text()))
  raise FileNotFoundError("CONTRIBUTING.md next to xrapture_test/")


def _column_sum(lora):
  return xrapture.implicit.use_implicit_args(lambda w: jnp.sum(w, axis=0))(lora)


class ContributingExampleTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    # Whatever the example registers is removed again after the test.
    saved = {name: list(handlers) for name, handlers in registry._HANDLERS.items()}

    def restore():
      registry._HANDLERS.clear()
      registry._HANDLERS.update(saved)

    self.addCleanup(restore)

  def test_both_files_are_in_the_guide(self):
    self.assertContainsSubset([_HANDLER, _TEST], list(_files()))

  def test_handler_and_its_test_work(self):
    files = _files()
    rng = np.random.default_rng(0)
    w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((6, 5), (2, 5), (6, 2)))
    lora = xrapture.LoraWeight(w, a, b, alpha=4.0)
    # Positive control: xrapture has no such handler, so the sum materializes.
    with self.assertRaises(xrapture.implicit.MaterializationError):
      with xrapture.implicit.strict_mode():
        _column_sum(lora)

    exec(compile(files[_HANDLER], _HANDLER, "exec"), {"__name__": "reduce"})  # pylint: disable=exec-used
    with xrapture.implicit.strict_mode():
      out = _column_sum(lora)
    dense = np.asarray(w) + 4.0 / 2 * np.asarray(b) @ np.asarray(a)
    np.testing.assert_allclose(out, dense.sum(axis=0), rtol=1e-5, atol=1e-5)

    scope = {"__name__": "reduce_test"}
    exec(compile(files[_TEST], _TEST, "exec"), scope)  # pylint: disable=exec-used
    loader = unittest.defaultTestLoader
    suite = unittest.TestSuite(
      loader.loadTestsFromTestCase(value)
      for value in scope.values()
      if isinstance(value, type) and issubclass(value, unittest.TestCase)
    )
    result = unittest.TestResult()
    suite.run(result)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    self.assertEmpty(problems)
    self.assertEqual(result.testsRun, 5)


if __name__ == "__main__":
  absltest.main()
