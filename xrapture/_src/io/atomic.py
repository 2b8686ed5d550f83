"""Atomic file writes: a reader sees the old file or the new one, never half."""

import contextlib
import os
import tempfile
from typing import Iterator


def _umask() -> int:
  """The process umask (reading it means setting it; restored at once)."""
  umask = os.umask(0o022)
  os.umask(umask)
  return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path in ``path``'s directory; renames it onto ``path``.

  The rename happens only when the block exits without an exception and
  after the data is flushed to disk; on error the temporary file is removed
  and ``path`` is left as it was.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
  os.close(fd)
  try:
    # mkstemp makes the file owner-only (0600); give it what open() would.
    os.chmod(tmp, 0o666 & ~_umask())
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
