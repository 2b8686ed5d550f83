"""PEFT's matching rules for ``target_modules`` and ``rank_pattern`` / ``alpha_pattern``.

``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``, restated without torch: which torch
modules a config targets, which pattern gives a module its rank or alpha, and
the patterns that give each exported module its own.
"""

import re
from typing import Any, Mapping


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
  for pattern in patterns:
    if re.match(rf"(.*\.)?({pattern})$", key):
      return pattern
  return None


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
  found = _pattern_key(patterns, key)
  return default if found is None else patterns[found]


def _peft_targets(config: Mapping[str, Any], key: str) -> bool:
  """Whether PEFT would put an adapter on torch module ``key``."""
  for module in config.get("modules_to_save") or ():
    if re.match(rf"(^|.*\.){module}($|\..*)", key):
      return False
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, key):
        return False
    elif key in exclude or any(key.endswith("." + e) for e in exclude):
      return False
  targets = config.get("target_modules")
  if targets is None:
    return False
  if targets == "all-linear":
    found = True  # every Linear but the output layer; PEFT checks that itself
  elif isinstance(targets, str):
    found = bool(re.fullmatch(targets, key))
  else:
    found = key in targets or any(key.endswith("." + t) for t in targets)
  layers = config.get("layers_to_transform")
  if found and layers is not None and layers != []:
    pattern = config.get("layers_pattern")
    if not pattern:
      match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
      match = None
      for p in [pattern] if isinstance(pattern, str) else pattern:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
        if match:
          break
    if match is None:
      return False
    index = int(match.group("idx"))
    found = index == layers if isinstance(layers, int) else index in layers
  return found


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
  """A rank/alpha pattern under which PEFT's lookup gives each module its value.

  Keys are module paths, longest first (PEFT takes the first key that matches
  a suffix of the module path); a module whose value is the default gets its
  own entry too when a shorter key would otherwise claim it.
  """
  chosen = {p: v for p, v in values.items() if v != default}
  for _ in range(len(values) + 2):
    ordered = dict(sorted(chosen.items(), key=lambda kv: (-len(kv[0]), kv[0])))
    wrong = [p for p, v in values.items() if _pattern_value(ordered, p, default) != v]
    if not wrong:
      return ordered
    for p in wrong:
      if p in chosen:  # a same-length key matched through a regex `.`
        del chosen[p]
        chosen[re.escape(p)] = values[p]
      else:
        chosen[p] = values[p]
  raise ValueError(f"Cannot express per-module values {dict(values)} as a PEFT pattern.")
