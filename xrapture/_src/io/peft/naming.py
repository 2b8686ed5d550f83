"""Which torch module each Haiku parameter is: the caller's ``name_map``.

A :data:`NameMap` takes a Haiku parameter path (``"module/param"``) to a torch
module path, or to a list of them, one per layer of a kernel stacked by
``hk.layer_stack``. ``_TORCH_PARAM`` names the torch parameter of each Haiku
parameter that PEFT can save whole.
"""

from typing import Callable, Mapping, Sequence, Union


# A torch module path, or one per index of the kernel's leading (layer) axis
# for kernels stacked by hk.layer_stack.
TorchPath = Union[str, Sequence[str]]
NameMap = Union[Mapping[str, TorchPath], Callable[[str], TorchPath | None]]


def _lookup(name_map: NameMap, path: str) -> TorchPath | None:
  if callable(name_map) and not isinstance(name_map, Mapping):
    return name_map(path)
  return name_map.get(path)


def _torch_paths(value: TorchPath) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


# Haiku parameter name -> torch parameter name (hk.Linear, hk.Conv*, hk.Embed,
# hk.LayerNorm / hk.RMSNorm).
_TORCH_PARAM = {"w": "weight", "embeddings": "weight", "scale": "weight",
                "b": "bias", "offset": "bias"}
