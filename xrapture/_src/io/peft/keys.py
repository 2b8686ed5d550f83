"""The safetensors keys of a PEFT adapter file, and reading them.

Each LoRA pair is keyed by its torch module path under ``base_model.model.``:
``<module>.lora_A.weight`` / ``.lora_B.weight`` (``nn.Linear``, ``nn.ConvNd``,
expert stacks), ``<module>.lora_embedding_A`` / ``_B`` (``nn.Embedding``), and
``<module>.lora_magnitude_vector`` for DoRA. Other keys are tensors PEFT saves
whole (``modules_to_save``, biases).
"""

from typing import Any, Mapping

import numpy as np


_PREFIX = "base_model.model."
_LINEAR = ("lora_A.weight", "lora_B.weight")
_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")
_MAGNITUDE = "lora_magnitude_vector"


def _parse_keys(tensors: Mapping[str, np.ndarray], where: str
                ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
  """LoRA pairs by torch module, and the other tensors, by key less the prefix."""
  groups: dict[str, dict[str, Any]] = {}
  others: dict[str, np.ndarray] = {}
  outside = []
  for key, value in tensors.items():
    if not key.startswith(_PREFIX):
      outside.append(key)
      continue
    rest = key[len(_PREFIX):]
    if rest.endswith("." + _MAGNITUDE):     # DoRA
      groups.setdefault(rest[:-len(_MAGNITUDE) - 1], {})["M"] = value
      continue
    found = None
    for kind, names in (("linear", _LINEAR), ("embedding", _EMBEDDING)):
      for part, name in zip("AB", names):
        if rest.endswith("." + name):
          found = (rest[:-len(name) - 1], kind, part)
    if found is None:
      others[rest] = value
      continue
    module, kind, part = found
    group = groups.setdefault(module, {})
    if group.setdefault("kind", kind) != kind:
      outside.append(key)
      continue
    group[part] = value
  if outside:
    raise ValueError(f"{where} has keys xrapture cannot read: {sorted(outside)}. "
                     f"Expected '{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' "
                     "or '.lora_embedding_A' / '.lora_embedding_B'.")
  incomplete = [f"{m} (only {'/'.join(p for p in 'ABM' if p in g)})"
                for m, g in groups.items() if "A" not in g or "B" not in g]
  if incomplete:
    raise ValueError(f"{where} is missing lora_A or lora_B for: {sorted(incomplete)} "
                     f"(M: {_MAGNITUDE}).")
  return groups, others
