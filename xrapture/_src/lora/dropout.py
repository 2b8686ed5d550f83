"""LoRA dropout: dropout on the input of the low-rank path only.

``xrapture.transform`` enters :func:`lora_dropout` around ``apply`` when the
config's ``dropout`` is positive and an rng is given; handlers then call
:func:`maybe_drop` on the activations they feed to the adapters. Keys come
from the implicit core's handler randomness, so every call site and every
step of a scanned layer stack draws its own mask.
"""

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

from xrapture._src.implicit import randomness

_RATE = contextvars.ContextVar("xrapture_lora_dropout", default=0.0)


@contextlib.contextmanager
def lora_dropout(rate: float, key: jax.Array | None) -> Iterator[None]:
  """Within this context the LoRA path's inputs are dropped with ``rate``."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"LoRA dropout rate must be in [0, 1), got {rate}")
  active = key is not None and rate > 0.0
  token = _RATE.set(rate if active else 0.0)
  try:
    with randomness.handler_rng(key if active else None):
      yield
  finally:
    _RATE.reset(token)


def active() -> bool:
  return _RATE.get() > 0.0 and randomness.active()


def maybe_drop(x: jax.Array) -> jax.Array:
  """``x`` with inverted dropout applied when LoRA dropout is active."""
  if not active():
    return x
  rate = _RATE.get()
  keep = jax.random.bernoulli(randomness.next_key(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
