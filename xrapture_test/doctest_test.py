"""Every ``>>>`` example in xrapture's docstrings runs and prints what it says."""

import doctest
import importlib
import pkgutil

from absl.testing import absltest
from absl.testing import parameterized
import xrapture


def _modules():
  names = []
  for info in pkgutil.walk_packages(xrapture.__path__, "xrapture."):
    module = importlib.import_module(info.name)
    finder = doctest.DocTestFinder()
    if any(t.examples for t in finder.find(module)):
      names.append(info.name)
  return names


_MODULES = _modules()


class DoctestTest(parameterized.TestCase):

  def test_some_modules_have_examples(self):
    self.assertNotEmpty(_MODULES)

  @parameterized.parameters(*_MODULES)
  def test_examples(self, name):
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0, f"{result.failed} doctest(s) failed in {name}")


if __name__ == "__main__":
  absltest.main()
