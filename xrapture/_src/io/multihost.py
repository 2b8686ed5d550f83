"""Writing files from every process of a multi-process (jax.distributed) run.

Every process calls the writer (``save_adapter``, ``export_peft``) with the
same global arrays. An array with shards on other processes' devices is
gathered to every process (a collective: all processes call it, in the same
order); process 0 writes, and the others wait until it has finished, so no
process returns before the file is whole. With one process nothing is
gathered and nobody waits.
"""

from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np


def to_numpy(x: Any) -> np.ndarray:
  """The whole value of ``x`` on this host; a collective if ``x`` spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_once(write: Callable[[], None], what: str) -> None:
  """Runs ``write`` on process 0; every process returns once it has finished.

  Args:
    write: writes the file (atomically).
    what: the file, for the error other processes raise.

  Raises:
    Whatever ``write`` raised, on process 0; RuntimeError on the others if
    it failed there.
  """
  if jax.process_count() == 1:
    write()
    return
  error = None
  if jax.process_index() == 0:
    try:
      write()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  # A collective: process 0 reaches it only after writing.
  done = multihost_utils.process_allgather(np.int32(error is None))
  if error is not None:
    raise error
  if not done[0]:
    raise RuntimeError(f"process 0 failed to write {what}; its log has the error.")
