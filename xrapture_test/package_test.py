"""Tests that the package is built, installed and tested as the README says."""

import glob
import importlib.metadata
import os
import re
import subprocess
import sys

from absl.testing import absltest
import xrapture

# The repository root: in the source tree, or in Bazel's runfiles (see //:repo_data).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TEST_DIR = os.path.join(_ROOT, 'xrapture_test')

# `import xrapture` / `from xrapture import ...`, at any indentation.
_PUBLIC_IMPORT = re.compile(r'^\s*(from xrapture import |import xrapture\s*$)',
                            re.MULTILINE)

# Set by test.sh for its pytest run, which must test the installed package.
_EXPECT_INSTALLED = os.environ.get('XRAPTURE_EXPECT_INSTALLED') == '1'


def _package_modules(package_dir):
  """Returns the .py files under `package_dir`, relative to it."""
  paths = glob.glob(os.path.join(package_dir, '**', '*.py'), recursive=True)
  return sorted(os.path.relpath(p, package_dir) for p in paths)


class VersionTest(absltest.TestCase):

  def test_version_is_pep440(self):
    self.assertRegex(xrapture.__version__, r'^\d+\.\d+\.\d+([ab]|rc|\.dev)?\d*$')

  def test_setup_py_reads_this_version(self):
    try:
      import setuptools  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    except ImportError:
      self.skipTest('setup.py needs setuptools')
    result = subprocess.run(
        [sys.executable, 'setup.py', '--version'],
        cwd=_ROOT, capture_output=True, text=True, check=True)
    # A stale install (source changed, not reinstalled) fails here.
    self.assertEqual(result.stdout.strip().splitlines()[-1],
                     xrapture.__version__)


  def test_version_is_written_once(self):
    # setup.py, xrapture.__version__ and the adapter files' header all read
    # xrapture/_src/version.py.
    from xrapture._src import version  # pylint: disable=g-import-not-at-top
    self.assertIs(xrapture.__version__, version.__version__)
    assignment = re.compile(r'^\s*__version__\s*=', re.MULTILINE)
    written = []
    for path in _package_modules(os.path.dirname(os.path.abspath(xrapture.__file__))):
      with open(os.path.join(os.path.dirname(xrapture.__file__), path)) as f:
        if assignment.search(f.read()):
          written.append(path)
    self.assertEqual(written, [os.path.join('_src', 'version.py')])


class PublicSurfaceTest(absltest.TestCase):

  def test_private_modules_do_not_import_the_public_face(self):
    # `import xrapture` inside _src would run the public __init__ from the
    # middle of its own import (a cycle) and tie private code to the facade.
    src_dir = os.path.join(os.path.dirname(os.path.abspath(xrapture.__file__)), '_src')
    offenders = []
    for path in _package_modules(src_dir):
      with open(os.path.join(src_dir, path)) as f:
        offenders += [f'_src/{path}: {m.group(0).strip()}'
                      for m in _PUBLIC_IMPORT.finditer(f.read())]
    self.assertEmpty(offenders)

  def test_positive_control_the_pattern_finds_a_public_import(self):
    self.assertTrue(_PUBLIC_IMPORT.search('def f():\n  from xrapture import __version__\n'))
    self.assertIsNone(_PUBLIC_IMPORT.search('from xrapture._src import version\n'))


class InstalledPackageTest(absltest.TestCase):
  """Only under test.sh's pytest run: is the installed package complete?"""

  def setUp(self):
    super().setUp()
    if not _EXPECT_INSTALLED:
      self.skipTest('XRAPTURE_EXPECT_INSTALLED=1 is set only by test.sh')

  def test_imported_from_site_packages(self):
    package_dir = os.path.dirname(os.path.realpath(xrapture.__file__))
    self.assertIn('site-packages', package_dir.split(os.sep))
    self.assertNotEqual(package_dir,
                        os.path.realpath(os.path.join(_ROOT, 'xrapture')))

  def test_distribution_version(self):
    self.assertEqual(importlib.metadata.version('xrapture'),
                     xrapture.__version__)

  def test_every_module_is_installed(self):
    installed = set(_package_modules(
        os.path.dirname(os.path.realpath(xrapture.__file__))))
    source = set(_package_modules(os.path.join(_ROOT, 'xrapture')))
    self.assertEmpty(sorted(source - installed),
                     'Not installed (a directory without __init__.py?)')
    self.assertEmpty(sorted(installed - source),
                     'Installed, but not in the source tree (stale build?)')

  def test_tests_are_not_installed(self):
    # Read the distribution's file list: an import would find the source
    # tree's xrapture_test once another test puts the repo root on sys.path.
    files = [str(f) for f in importlib.metadata.files('xrapture') or ()]
    self.assertNotEmpty(files)
    self.assertEmpty([f for f in files if f.startswith('xrapture_test')])


class TestFilesTest(absltest.TestCase):

  def test_every_test_file_runs_under_bazel(self):
    # Bazel runs each *_test.py as a script: without this it passes vacuously.
    main = re.compile(r'^if __name__ == .__main__.:\n\s+absltest\.main\(\)',
                      re.MULTILINE)
    test_files = glob.glob(os.path.join(_TEST_DIR, '*_test.py'))
    self.assertIn(os.path.abspath(__file__), map(os.path.abspath, test_files))
    for path in test_files:
      with open(path) as f:
        self.assertRegex(f.read(), main, msg=path)

  def test_public_names_exist(self):
    for name in getattr(xrapture, '__all__', ()):
      self.assertTrue(hasattr(xrapture, name), name)


if __name__ == '__main__':
  absltest.main()
