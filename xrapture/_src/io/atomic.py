"""Atomic file writes: a reader sees the old file or the new one, never half.

The one implementation of "temporary name, fsync, rename, fsync the
directory" in the repository: the library's adapter files use it, and so do
the launchers (``experiments/atomic.py`` adds JSON/text shorthands and the
clean-up of what a killed writer left). A killed writer leaves at most a
``.tmp-*`` file or directory next to the target.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

TMP_PREFIX = ".tmp-"


def _umask() -> int:
  """The process umask (reading it means setting it; restored at once)."""
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


def fsync(path: str | os.PathLike) -> None:
  """fsyncs a file (its data) or a directory (the names in it: a rename)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _parent(path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  return directory


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path in ``path``'s directory; renames it onto ``path``.

  The rename happens only when the block exits without an exception, after
  the data is flushed to disk; the directory is flushed after the rename. On
  an exception the temporary file is removed and ``path`` is left as it was.
  """
  path = os.fspath(path)
  directory = _parent(path)
  fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-",
                             dir=directory)
  os.close(fd)
  try:
    # mkstemp makes the file owner-only (0600); give it what open() would.
    os.chmod(tmp, 0o666 & ~_umask())
    yield tmp
    fsync(tmp)
    os.replace(tmp, path)
    fsync(directory)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_new_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary directory next to ``path``; renames it onto ``path``.

  For a directory that must appear whole (its files written and flushed) or
  not at all. ``path`` must not exist: a rename cannot replace a non-empty
  directory. On an exception the temporary directory is removed.
  """
  path = os.fspath(path)
  directory = _parent(path)
  tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + os.path.basename(path) + "-",
                         dir=directory)
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
    yield tmp
    for name in os.listdir(tmp):
      fsync(os.path.join(tmp, name))
    fsync(tmp)
    os.replace(tmp, path)
    fsync(directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
