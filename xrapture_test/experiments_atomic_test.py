"""Tests for experiments/atomic.py: whole-file writes, fsynced; leftovers removed."""

import json
import os
import stat
from unittest import mock

from absl.testing import absltest
from xrapture._src.io import atomic as library_atomic

import test_utils

test_utils.append_repo_root()
from experiments import atomic  # pylint: disable=g-import-not-at-top,wrong-import-position


class AtomicTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = test_utils.tmpdir(self)
    self.path = os.path.join(self.dir, 'sub', 'result.json')

  def test_writes_json_readable_like_any_file(self):
    atomic.write_json(self.path, {'b': 1, 'a': [1.5]})
    with open(self.path) as f:
      self.assertEqual(json.load(f), {'a': [1.5], 'b': 1})
    umask = os.umask(0o022)
    os.umask(umask)
    self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o666 & ~umask)
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ['result.json'])

  def test_a_failed_write_keeps_the_old_file(self):
    atomic.write_text(self.path, 'old')
    with self.assertRaisesRegex(OSError, 'disk full'):
      with atomic.atomic_path(self.path) as tmp:
        with open(tmp, 'w') as f:
          f.write('half')
        raise OSError('disk full')
    with open(self.path) as f:
      self.assertEqual(f.read(), 'old')
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ['result.json'])

  def test_the_data_and_the_rename_are_fsynced(self):
    fsynced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
      fsynced.append(os.readlink(f'/proc/self/fd/{fd}'))
      return real_fsync(fd)
    with mock.patch.object(os, 'fsync', recording_fsync):
      atomic.write_text(self.path, 'new')
    directory = os.path.dirname(self.path)
    self.assertLen(fsynced, 2)
    self.assertTrue(os.path.basename(fsynced[0]).startswith('.tmp-result.json-'))
    self.assertEqual(os.path.dirname(fsynced[0]), directory)  # before the rename
    self.assertEqual(fsynced[1], directory)  # after it

  def test_one_implementation_with_the_library(self):
    # The launchers write through the library's atomic_path, not a copy.
    self.assertIs(atomic.atomic_path, library_atomic.atomic_path)
    self.assertEqual(atomic.TMP_PREFIX, library_atomic.TMP_PREFIX)

  def test_remove_leftovers(self):
    atomic.write_text(self.path, 'kept')
    directory = os.path.dirname(self.path)
    open(os.path.join(directory, '.tmp-result.json-abc'), 'w').close()
    os.makedirs(os.path.join(directory, '.tmp-step_00000009-x', 'inner'))
    self.assertEqual(atomic.remove_leftovers(directory),
                     ['.tmp-result.json-abc', '.tmp-step_00000009-x'])
    self.assertEqual(os.listdir(directory), ['result.json'])
    self.assertEqual(atomic.remove_leftovers(os.path.join(self.dir, 'missing')), [])


if __name__ == '__main__':
  absltest.main()
