"""Files written whole or not at all: temporary name, fsync, rename, fsync.

Every file experiments/ writes goes through :func:`atomic_path`, the
library's own (``xrapture._src.io.atomic``; adapter and base files through
``xrapture.save_adapter``, checkpoints through orbax), so a reader sees the
old file or the new one, and a killed writer leaves at most a ``.tmp-*``
file, which :func:`remove_leftovers` deletes. This module adds the text and
JSON shorthands and that clean-up.
"""

import json
import os
import shutil
from typing import Any

from xrapture._src.io import atomic as _atomic

# The library's atomic write, one implementation for both (see its module).
TMP_PREFIX = _atomic.TMP_PREFIX
atomic_path = _atomic.atomic_path
fsync = _atomic.fsync


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
