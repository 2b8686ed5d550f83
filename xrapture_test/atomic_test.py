"""Tests for atomic file writes (xrapture/_src/io/atomic.py)."""

import os
import pathlib
import stat
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from xrapture._src.io import atomic

import test_utils


def _files(directory):
  return sorted(os.listdir(directory))


class _FailingFile:
  """A file whose write stores half the data, then fails (disk full)."""

  def __init__(self, path):
    self._f = open(path, "wb")  # pylint: disable=consider-using-with

  def write(self, data):
    self._f.write(data[:len(data) // 2])
    self._f.flush()
    raise OSError(28, "No space left on device")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


class AtomicWriteTest(parameterized.TestCase):

  def _file(self, content):
    path = os.path.join(test_utils.tmpdir(self), "adapter.safetensors")
    with open(path, "wb") as f:
      f.write(content)
    return path

  @parameterized.parameters(str, pathlib.Path)
  def test_writes_new_file(self, path_type):
    directory = test_utils.tmpdir(self)
    path = os.path.join(directory, "sub", "adapter.bin")  # directory made too
    atomic.atomic_write_bytes(path_type(path), b"hello")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"hello")
    self.assertEqual(_files(os.path.dirname(path)), ["adapter.bin"])

  def test_replaces_existing_file(self):
    path = self._file(b"old")
    atomic.atomic_write_bytes(path, b"new contents")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"new contents")

  def test_failure_mid_write_leaves_old_file(self):
    path = self._file(b"old contents")
    directory = os.path.dirname(path)
    before = _files(directory)
    def failing_open(file, mode="r", *args, **kwargs):
      if "w" in mode:
        return _FailingFile(file)
      return open(file, mode, *args, **kwargs)  # pylint: disable=unspecified-encoding
    with mock.patch.object(atomic, "open", failing_open, create=True):
      with self.assertRaisesRegex(OSError, "No space left"):
        atomic.atomic_write_bytes(path, b"x" * 1000)
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"old contents")
    self.assertEqual(_files(directory), before)  # no temporary file left

  def test_exception_in_block_leaves_old_file(self):
    path = self._file(b"old")
    directory = os.path.dirname(path)
    before = _files(directory)
    with self.assertRaisesRegex(RuntimeError, "boom"):
      with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
          f.write(b"half")
        # Until the block ends, readers see the old file.
        with open(path, "rb") as f:
          self.assertEqual(f.read(), b"old")
        self.assertEqual(os.path.dirname(tmp), directory)
        raise RuntimeError("boom")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"old")
    self.assertEqual(_files(directory), before)

  def test_failed_rename_leaves_old_file(self):
    path = self._file(b"old")
    directory = os.path.dirname(path)
    before = _files(directory)
    with mock.patch.object(atomic.os, "replace", side_effect=OSError("rename failed")):
      with self.assertRaisesRegex(OSError, "rename failed"):
        atomic.atomic_write_bytes(path, b"new")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"old")
    self.assertEqual(_files(directory), before)

  def test_permissions_follow_umask(self):
    # mkstemp's 0600 must not leak into the final file.
    directory = test_utils.tmpdir(self)
    old = os.umask(0o027)
    try:
      atomic.atomic_write_bytes(os.path.join(directory, "a"), b"x")
      with open(os.path.join(directory, "b"), "wb") as f:
        f.write(b"x")
    finally:
      os.umask(old)

    def mode(name):
      return stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
    self.assertEqual(mode("a"), mode("b"))
    self.assertEqual(mode("a"), 0o640)
    self.assertEqual(os.umask(old), old)  # umask restored


class AtomicNewDirTest(parameterized.TestCase):

  def test_appears_whole_with_its_files_fsynced(self):
    parent = test_utils.tmpdir(self)
    path = os.path.join(parent, "adapter")
    fsynced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
      fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
      return real_fsync(fd)
    with mock.patch.object(atomic.os, "fsync", recording_fsync):
      with atomic.atomic_new_dir(path) as tmp:
        for name in ("a.json", "b.bin"):
          with open(os.path.join(tmp, name), "w") as f:
            f.write(name)
        self.assertFalse(os.path.exists(path))  # not before the block ends
    self.assertEqual(_files(parent), ["adapter"])
    self.assertEqual(_files(path), ["a.json", "b.bin"])
    # Both files and the directory before the rename; the parent after it.
    self.assertEqual([os.path.basename(f) for f in fsynced[:2]], ["a.json", "b.bin"])
    self.assertTrue(os.path.basename(fsynced[2]).startswith(atomic.TMP_PREFIX))
    self.assertEqual(fsynced[3:], [parent])
    mode = stat.S_IMODE(os.stat(path).st_mode)
    old = os.umask(0)
    os.umask(old)
    self.assertEqual(mode, 0o777 & ~old)  # not mkdtemp's 0700

  def test_an_exception_leaves_nothing(self):
    parent = test_utils.tmpdir(self)
    with self.assertRaisesRegex(RuntimeError, "boom"):
      with atomic.atomic_new_dir(os.path.join(parent, "adapter")) as tmp:
        with open(os.path.join(tmp, "a.json"), "w") as f:
          f.write("half")
        raise RuntimeError("boom")
    self.assertEqual(_files(parent), [])


if __name__ == "__main__":
  absltest.main()
