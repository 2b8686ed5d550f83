"""pytest setup shared by every test file (Bazel runs the files without it)."""

import os

# Sharding tests need 8 devices; on CPU, XLA fakes them. This must happen before
# jax is first imported. Test files that need the devices set it too, for Bazel.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

# Helpers the test files import, not tests (pytest.ini collects *_test.py
# only; this holds however pytest is configured).
collect_ignore = ['test_utils.py']

# The test command's py312 leg (no torch there) writes here the tests skipped
# for a missing extra (their reason says "pip install 'xrapture[...]'"), and
# the py311 leg runs exactly those: the suite is split, not repeated. xdist
# workers and the controller may both append a line; the reader dedupes.
_RECORD_SKIPS_ENV = 'XRAPTURE_RECORD_SKIPS'
_EXTRA_HINT = "pip install 'xrapture["


def _record_skip(report):
  path = os.environ.get(_RECORD_SKIPS_ENV)
  if not path or not report.skipped:
    return
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  if _EXTRA_HINT in reason:
    with open(path, 'a') as f:
      f.write(report.nodeid + '\n')


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_collectreport(report):
  _record_skip(report)
