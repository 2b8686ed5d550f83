"""Type aliases used on xrapture's public signatures, and what an array leaf is."""

from collections.abc import Mapping
from typing import Any, TypeAlias

import jax
import numpy as np

# Haiku-style parameters: {module name: {parameter name: array}}. In adapted
# params the targeted kernels are LoraWeights; in a trainable split, removed
# leaves are EmptyNode.
Params: TypeAlias = Mapping[str, Mapping[str, Any]]

# One entry per base parameter, in the structure of its Params: an adapter
# rank (> 0), LORA_FULL (trained in full) or LORA_FREEZE. What
# `model.lora_spec(base_params)` returns.
LoraSpec: TypeAlias = Mapping[str, Mapping[str, int]]


# What counts as an array leaf of a pytree (traced as data, not a static
# Python value): JAX and numpy arrays and numpy scalars. The one definition
# the interpreter's trace cache, the transform's example inputs and the
# layout tracer share.
ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def is_array(x: Any) -> bool:
  """Whether ``x`` is an array leaf (see ``ARRAY_TYPES``)."""
  return isinstance(x, ARRAY_TYPES)
