"""Random keys for handlers (e.g. LoRA dropout), distinct per call and per loop step.

``with handler_rng(key):`` makes :func:`next_key` available to handlers while
a function is interpreted. Each call folds a fresh counter into the key; loop
rules fold in the iteration number, so a scanned body traced once still draws
a different key at every step.
"""

import contextlib
import contextvars
from typing import Iterator

import jax

_STATE: contextvars.ContextVar["_State | None"] = contextvars.ContextVar(
  "xrapture_handler_rng", default=None
)


class _State:
  __slots__ = ("key", "count")

  def __init__(self, key):
    self.key, self.count = key, 0


@contextlib.contextmanager
def handler_rng(key: jax.Array | None) -> Iterator[None]:
  """Within this context handlers may draw keys derived from ``key``."""
  token = _STATE.set(None if key is None else _State(key))
  try:
    yield
  finally:
    _STATE.reset(token)


def active() -> bool:
  return _STATE.get() is not None


def _fresh(state: _State) -> jax.Array:
  state.count += 1
  return jax.random.fold_in(state.key, state.count)


def next_key() -> jax.Array | None:
  """A fresh key, or None outside :func:`handler_rng`."""
  state = _STATE.get()
  return None if state is None else _fresh(state)


@contextlib.contextmanager
def loop_step(step: jax.Array) -> Iterator[None]:
  """Inside a loop body: derive keys from the current key and ``step``."""
  state = _STATE.get()
  if state is None:
    yield
    return
  with handler_rng(jax.random.fold_in(_fresh(state), step)):
    yield
