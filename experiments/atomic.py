"""Files written whole or not at all: temporary name, fsync, rename, fsync.

Every file experiments/ writes goes through :func:`atomic_path` (adapter and
base files through ``xrapture.save_adapter``, checkpoints through orbax), so
a reader sees the old file or the new one, and a killed writer leaves at
most a ``.tmp-*`` file, which :func:`remove_leftovers` deletes.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

TMP_PREFIX = '.tmp-'


def _umask() -> int:
  umask = os.umask(0o022)  # reading it means setting it; restored at once
  os.umask(umask)
  return umask


def fsync(path: str) -> None:
  """fsyncs a file (its data) or a directory (the names in it: a rename)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to ``path``; renames it onto ``path`` on success.

  The file's data and the directory entry are fsynced. On an exception the
  temporary file is removed and ``path`` is left as it was.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + '-',
                             dir=directory)
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
    yield tmp
    fsync(tmp)
    os.replace(tmp, path)
    fsync(directory)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def write_json(path: str, record: Any) -> None:
  write_text(path, json.dumps(record, indent=1, sort_keys=True))


def remove_leftovers(directory: str) -> list[str]:
  """Deletes the ``.tmp-*`` files and directories killed writers left in ``directory``.

  Returns:
    The names deleted.
  """
  if not os.path.isdir(directory):
    return []
  removed = []
  for name in sorted(os.listdir(directory)):
    if name.startswith(TMP_PREFIX):
      path = os.path.join(directory, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
      removed.append(name)
  return removed
