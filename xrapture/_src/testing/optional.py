"""The tests' optional dependencies: torch, peft, bitsandbytes.

They are installed with ``pip install xrapture[peft]``, which the test
command does on Python 3.11 only (torch's CPU build lies on the CI machines'
disk for 3.11; elsewhere it is a multi-GB download). Where they are missing,
the tests that need them are skipped with a message naming them, unless
``XRAPTURE_REQUIRE_TORCH=1`` (the test command's full leg sets it): then a
missing one is an error.

Examples:
  A test module whose every test needs torch::

    torch, bnb = optional.require("torch", "bitsandbytes.functional")

  One whose other tests run without it::

    torch, peft = optional.modules("torch", "peft")  # None, None if missing
    ...
    @absltest.skipIf(torch is None, optional.MISSING)
"""

import importlib
import os
import sys
import unittest
import warnings
from types import ModuleType

REQUIRE_ENV = "XRAPTURE_REQUIRE_TORCH"

MISSING = (
    "needs torch, peft and bitsandbytes (pip install 'xrapture[peft]'; "
    f"Python 3.11 in the test command), not importable on Python "
    f"{sys.version_info.major}.{sys.version_info.minor}")


def _required() -> bool:
  return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _import(names: tuple[str, ...]) -> tuple[list[ModuleType | None], list[str]]:
  found: list[ModuleType | None] = []
  missing: list[str] = []
  for name in names:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns about optional packages
        found.append(importlib.import_module(name))
    except ImportError as e:
      found.append(None)
      missing.append(f"{name} ({e})")
  return found, missing


def modules(*names: str) -> tuple[ModuleType | None, ...]:
  """Imports ``names``; all None if any is missing (and not required).

  Raises:
    ImportError: one is missing and ``XRAPTURE_REQUIRE_TORCH=1``.
  """
  found, missing = _import(names)
  if not missing:
    return tuple(found)
  if _required():
    raise ImportError(f"{REQUIRE_ENV}=1 but these are not importable: "
                      f"{', '.join(missing)}. Install them: pip install 'xrapture[peft]'.")
  return (None,) * len(names)


def require(*names: str) -> tuple[ModuleType, ...] | ModuleType:
  """Imports ``names`` or skips the calling test module (one name: the module).

  Raises:
    unittest.SkipTest: one is missing (pytest skips the module).
    ImportError: one is missing and ``XRAPTURE_REQUIRE_TORCH=1``.
  """
  found = modules(*names)
  if found[0] is None:
    _, missing = _import(names)
    raise unittest.SkipTest(f"{MISSING}: missing {', '.join(missing)}")
  present = tuple(m for m in found if m is not None)  # all: modules() gives all or none
  return present[0] if len(present) == 1 else present
