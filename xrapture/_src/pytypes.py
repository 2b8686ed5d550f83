"""Type aliases used on xrapture's public signatures."""

from collections.abc import Mapping
from typing import Any, TypeAlias

# Haiku-style parameters: {module name: {parameter name: array}}. In adapted
# params the targeted kernels are LoraWeights; in a trainable split, removed
# leaves are EmptyNode.
Params: TypeAlias = Mapping[str, Mapping[str, Any]]

# One entry per base parameter, in the structure of its Params: an adapter
# rank (> 0), LORA_FULL (trained in full) or LORA_FREEZE. What
# `model.lora_spec(base_params)` returns.
LoraSpec: TypeAlias = Mapping[str, Mapping[str, int]]
