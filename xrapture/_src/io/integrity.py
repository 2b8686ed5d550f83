"""Checksums of adapter files: what was saved is what is loaded, or an error.

A record of SHA-256 digests (``hashlib``) goes into the file's header: one of
the header's own fields (all but ``entries`` and the record itself), one per
entry (its canonical JSON: every field, whatever fields entries gain later),
and one per tensor (dtype, shape and bytes). Verifying recomputes them all and
names what differs.
"""

import hashlib
import json
from typing import Any, Mapping

import numpy as np

ALGORITHM = "sha256"
KEY = "checksum"
_ENTRIES = "entries"


def _canonical(value: Any) -> bytes:
  """JSON with sorted keys and no spaces: equal values give equal bytes."""
  return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _digest(*parts: bytes) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(len(part).to_bytes(8, "little"))  # no two splits hash alike
    h.update(part)
  return h.hexdigest()


def tensor_digest(arr: np.ndarray) -> str:
  """The digest of a tensor's dtype, shape and bytes (C order)."""
  arr = np.asarray(arr)
  return _digest(arr.dtype.str.encode(), _canonical(list(arr.shape)),
                 np.ascontiguousarray(arr).tobytes())


def _header_fields(header: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in header.items() if k not in (KEY, _ENTRIES)}


def record(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The checksum record of ``header`` (without one) and ``tensors``."""
  return {
      "algorithm": ALGORITHM,
      "header": _digest(_canonical(_header_fields(header))),
      "entries": {name: _digest(_canonical(entry))
                  for name, entry in header[_ENTRIES].items()},
      "tensors": {name: tensor_digest(arr) for name, arr in tensors.items()},
  }


def _names(names) -> str:
  return ", ".join(f"'{n}'" for n in sorted(names))


def problems(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> list[str]:
  """What in ``header`` and ``tensors`` differs from ``header``'s checksum record.

  Returns:
    One line per difference (empty: everything matches), naming the header
    fields, entry or tensor that changed.
  """
  saved = header[KEY]
  if not isinstance(saved, dict) or saved.get("algorithm") != ALGORITHM or not all(
      isinstance(saved.get(k), dict if k != "header" else str)
      for k in ("header", "entries", "tensors")):
    return [f"the checksum record itself is damaged: {saved!r:.200}"]
  now = record(header, tensors)
  out = []
  if saved["header"] != now["header"]:
    out.append("header fields " + _names(_header_fields(header))
               + " differ from what was saved")
  for kind in ("entries", "tensors"):
    before, after = saved[kind], now[kind]
    if set(before) - set(after):
      out.append(f"{kind} {_names(set(before) - set(after))} were saved but are gone")
    if set(after) - set(before):
      out.append(f"{kind} {_names(set(after) - set(before))} were not saved")
    changed = [n for n in after if n in before and before[n] != after[n]]
    if changed and kind == "entries":
      out.append(f"header entries {_names(changed)} differ from what was saved "
                 "(one of their fields: kind, rank, alpha, rslora, shapes, dtypes, ...)")
    elif changed:
      out.append(f"tensors {_names(changed)} differ from what was saved "
                 "(data, dtype or shape)")
  return out
