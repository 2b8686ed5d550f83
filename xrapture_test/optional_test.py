"""The tests' optional dependencies: skipped where missing, an error where required."""

import os
import unittest
from unittest import mock

from absl.testing import absltest
from xrapture._src.testing import optional

_ABSENT = "xrapture_no_such_module"


class OptionalTest(absltest.TestCase):

  def test_present_modules_are_returned(self):
    (json,) = optional.modules("json")
    self.assertEqual(json.dumps([1]), "[1]")
    self.assertIs(optional.require("json"), json)

  def test_missing_module_gives_none_or_skips(self):
    with mock.patch.dict(os.environ, {optional.REQUIRE_ENV: ""}):
      self.assertEqual(optional.modules("json", _ABSENT), (None, None))
      with self.assertRaisesRegex(unittest.SkipTest, _ABSENT):
        optional.require("json", _ABSENT)

  def test_missing_module_is_an_error_where_required(self):
    with mock.patch.dict(os.environ, {optional.REQUIRE_ENV: "1"}):
      with self.assertRaisesRegex(ImportError, rf"{optional.REQUIRE_ENV}=1.*{_ABSENT}"):
        optional.modules(_ABSENT)
      with self.assertRaisesRegex(ImportError, "pip install"):
        optional.require(_ABSENT)


if __name__ == "__main__":
  absltest.main()
