"""Byte-level corpora from the Python standard library, split deterministically.

Two domains, both read from the running interpreter's own installation, so
they are on every machine that runs Python and need no download:

* ``code``: the standard library's pure-Python modules (``*.py`` under
  ``sysconfig.get_paths()['stdlib']``, without test suites, ``site-packages``
  and ``pydoc_data``), one document per file, named by its relative path.
* ``docs``: the Python Language Reference and library-manual text that
  ``help()`` shows, from ``pydoc_data.topics`` (English prose with grammar
  rules and short examples), one document per topic, named by the topic.

A document goes to ``train``, ``val`` or ``test`` by the SHA-256 of its name
(80 / 10 / 10), so splits do not depend on file order or on the machine, only
on the Python version (a different version ships different text). The
documents of a split are concatenated, each followed by a NUL byte.

Batches are a pure function of ``(seed, step)``: a checkpoint needs only the
step to resume the same data order.
"""

import dataclasses
import functools
import hashlib
import os
import sysconfig

import numpy as np

DOMAINS = ('code', 'docs')
SPLITS = ('train', 'val', 'test')
# Fractions of documents (by hash) in train and val; the rest is test.
_TRAIN_FRACTION, _VAL_FRACTION = 0.8, 0.1
# Directory names left out of the `code` domain: tests, third-party packages,
# and the `docs` domain's source.
_CODE_EXCLUDED_DIRS = frozenset({
    '__pycache__', 'idle_test', 'pydoc_data', 'site-packages', 'test', 'tests',
})
# Ends every document, so a window that spans two documents sees a boundary.
SEPARATOR = 0


def split_of(name: str) -> str:
  """The split (``'train'``, ``'val'`` or ``'test'``) of document ``name``."""
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64
  if u < _TRAIN_FRACTION:
    return 'train'
  return 'val' if u < _TRAIN_FRACTION + _VAL_FRACTION else 'test'


def code_documents() -> list[tuple[str, bytes]]:
  """``(relative path, source bytes)`` of the stdlib's pure-Python modules."""
  root = sysconfig.get_paths()['stdlib']
  docs = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _CODE_EXCLUDED_DIRS)
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        with open(path, 'rb') as f:
          docs.append((os.path.relpath(path, root).replace(os.sep, '/'), f.read()))
  return docs


def docs_documents() -> list[tuple[str, bytes]]:
  """``(topic, text bytes)`` of the reference text in ``pydoc_data.topics``."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return [(name, text.encode('utf-8')) for name, text in sorted(topics.topics.items())]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One domain's splits as ``uint8`` byte streams.

  Attributes:
    domain: ``'code'`` or ``'docs'``.
    splits: split name -> the split's documents, concatenated.
    names: split name -> the names of its documents, in order.
  """
  domain: str
  splits: dict[str, np.ndarray]
  names: dict[str, tuple[str, ...]]

  def describe(self) -> str:
    return ', '.join(f'{s} {len(self.names[s])} docs / {self.splits[s].size:,} bytes'
                     for s in SPLITS)


@functools.lru_cache(maxsize=None)
def load(domain: str) -> Corpus:
  """Reads and splits ``domain`` (cached per process).

  Raises:
    ValueError: an unknown domain, or a split that came out too small.
  """
  if domain == 'code':
    documents = code_documents()
  elif domain == 'docs':
    documents = docs_documents()
  else:
    raise ValueError(f'Unknown data domain {domain!r}; expected one of {DOMAINS}.')
  parts = {s: [] for s in SPLITS}
  names = {s: [] for s in SPLITS}
  for name, text in documents:
    split = split_of(name)
    parts[split].append(text + bytes([SEPARATOR]))
    names[split].append(name)
  splits = {s: np.frombuffer(b''.join(parts[s]), np.uint8) for s in SPLITS}
  for s in SPLITS:
    if splits[s].size < 4096:
      raise ValueError(
          f'The {domain!r} corpus has only {splits[s].size} bytes in its {s!r} '
          f'split ({len(documents)} documents under this Python installation).')
  return Corpus(domain, splits, {s: tuple(n) for s, n in names.items()})


def train_batch(data: np.ndarray, seed: int, step: int, batch_size: int,
                seq_len: int) -> np.ndarray:
  """Batch ``step`` of training windows: ``[batch_size, seq_len]`` int32.

  Window starts are uniform over ``data``, drawn from a generator seeded
  with ``(seed, step)``.
  """
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, data.size - seq_len + 1, size=batch_size)
  return np.stack([data[s:s + seq_len] for s in starts]).astype(np.int32)


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int | None = None) -> list[np.ndarray]:
  """Fixed evaluation windows over ``data``, ``[batch_size, seq_len]`` each.

  Args:
    data: a split.
    batch_size: windows per batch.
    seq_len: bytes per window.
    num_batches: how many batches, spread evenly over ``data`` (None: as many
      as fit without overlap).

  Returns:
    The same list of batches on every call.
  """
  windows = data.size // seq_len
  count = windows if num_batches is None else num_batches * batch_size
  count = max(batch_size, count - count % batch_size)
  starts = np.linspace(0, data.size - seq_len, count).astype(np.int64)
  batch = np.stack([data[s:s + seq_len] for s in starts]).astype(np.int32)
  return list(batch.reshape(-1, batch_size, seq_len))
