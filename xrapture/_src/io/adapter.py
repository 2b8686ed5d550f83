"""save_adapter / load_adapter: only what training changed, in one safetensors file.

The file holds the adapters' ``a`` and ``b`` (and a DoRA adapter's
``magnitude``) and every ``LORA_FULL`` leaf as
tensors, and in its header (safetensors metadata) a JSON record of each
entry's kind, rank, alpha, base shape and dtype, plus the versions that wrote
it. Loading checks every entry against the base params it is applied to.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from xrapture._src.io import atomic
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import paths

LoraWeight = lora_weight.LoraWeight
FORMAT = "xrapture-adapter"
FORMAT_VERSION = 1
_META_KEY = "xrapture"


def _to_numpy(x: Any) -> tuple[np.ndarray, str]:
  """Array -> (array safetensors can store, dtype name to restore)."""
  arr = np.asarray(jax.device_get(x))
  name = jnp.dtype(arr.dtype).name
  if name == "bfloat16":
    return arr.view(np.uint16), name
  return arr, name


def _from_numpy(arr: np.ndarray, name: str) -> jax.Array:
  if name == "bfloat16":
    return jnp.asarray(arr.view(jnp.bfloat16))
  return jnp.asarray(arr)


def save_adapter(path: str, params: Any, lora_spec: Any) -> None:
  """Writes the trainable part of ``params`` to ``path`` atomically.

  Args:
    path: the file to write (``.safetensors`` by convention).
    params: adapted params (with LoraWeights).
    lora_spec: ``model.spec(base_params)``: ``LORA_FULL`` leaves are saved
      too, frozen ones are not.
  """
  from xrapture import __version__  # pylint: disable=g-import-not-at-top
  flat_params, _ = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  if len(ranks) != len(flat_params):
    raise ValueError(
        f"lora_spec has {len(ranks)} entries but params have {len(flat_params)} "
        "parameters; pass model.spec(base_params) for these params.")
  tensors, entries = {}, {}
  for (path_, value), rank in zip(flat_params, ranks):
    if dora.is_adapter(value):
      a, a_dtype = _to_numpy(value.a)
      b, b_dtype = _to_numpy(value.b)
      tensors[path_ + "::a"], tensors[path_ + "::b"] = a, b
      entries[path_] = dict(
          kind="lora", rank=int(value.rank), alpha=float(value.alpha),
          rslora=bool(value.rslora), base_shape=list(value.shape),
          base_dtype=jnp.dtype(value.dtype).name, a_dtype=a_dtype, b_dtype=b_dtype)
      if isinstance(value, dora.DoraWeight):
        m, m_dtype = _to_numpy(value.magnitude)
        tensors[path_ + "::magnitude"] = m
        entries[path_].update(kind="dora", magnitude_dtype=m_dtype,
                              layout=value.layout)
    elif rank == lora_weight.LORA_FULL:
      arr, dtype = _to_numpy(value)
      tensors[path_] = arr
      entries[path_] = dict(kind="full", base_shape=list(np.shape(value)),
                            base_dtype=dtype)
  header = dict(format=FORMAT, format_version=FORMAT_VERSION,
                xrapture_version=__version__, jax_version=jax.__version__,
                entries=entries)
  data = safetensors.numpy.save(tensors, metadata={_META_KEY: json.dumps(header)})
  atomic.atomic_write_bytes(path, data)


def read_adapter(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The header record and raw tensors of an adapter file.

  Raises:
    ValueError: the file is truncated, corrupt or not an xrapture adapter.
  """
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except FileNotFoundError:
    raise
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(
        f"{path} is not a readable adapter file (truncated or corrupt?): {e}") from e
  if _META_KEY not in metadata:
    raise ValueError(f"{path} is a safetensors file without an xrapture header; "
                     "was it written by xrapture.save_adapter?")
  header = json.loads(metadata[_META_KEY])
  if header.get("format") != FORMAT or header.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{path}: unsupported adapter format {header.get('format')} "
                     f"version {header.get('format_version')}")
  return header, tensors


def load_adapter(path: str, base_params: Any) -> Any:
  """Applies the adapter file at ``path`` to ``base_params``.

  Returns:
    params like ``base_params`` with LoraWeights (and full-trained leaves)
    restored; nothing else changes.

  Raises:
    ValueError: the file is unreadable, or does not fit ``base_params``: the
      message names every path that is missing or whose shape or dtype
      differs, with both shapes. Nothing is partially applied.
  """
  header, tensors = read_adapter(path)
  entries = header["entries"]
  flat, treedef = paths.flatten_with_paths(base_params)
  by_path = dict(flat)
  problems = []
  for name, entry in entries.items():
    if name not in by_path:
      problems.append(f"'{name}' is in the file but not in these base params")
      continue
    base = by_path[name]
    base = base.w if dora.is_adapter(base) else base
    shape, dtype = tuple(np.shape(base)), jnp.dtype(base.dtype).name
    if shape != tuple(entry["base_shape"]) or dtype != entry["base_dtype"]:
      problems.append(f"'{name}' was {tuple(entry['base_shape'])} {entry['base_dtype']} "
                      f"there and is {shape} {dtype} here")
  if problems:
    raise ValueError(
        f"{path} was saved for another base ({len(problems)} mismatches):\n  "
        + "\n  ".join(problems) + "\nBase parameters:\n" + paths.describe(base_params))
  for name, entry in entries.items():
    keys = {"lora": [name + "::a", name + "::b"],
            "dora": [name + "::a", name + "::b", name + "::magnitude"]
            }.get(entry["kind"], [name])
    missing = [k for k in keys if k not in tensors]
    if missing:
      raise ValueError(f"{path} is inconsistent: its header lists '{name}' but "
                       f"tensors {missing} are missing (truncated or edited file?)")
  out = []
  for name, base in flat:
    if dora.is_adapter(base):
      base = base.w
    entry = entries.get(name)
    if entry is None:
      out.append(base)
    elif entry["kind"] == "lora":
      a = _from_numpy(tensors[name + "::a"], entry["a_dtype"])
      b = _from_numpy(tensors[name + "::b"], entry["b_dtype"])
      out.append(LoraWeight(base, a, b, alpha=entry["alpha"], rslora=entry["rslora"]))
    elif entry["kind"] == "dora":
      a = _from_numpy(tensors[name + "::a"], entry["a_dtype"])
      b = _from_numpy(tensors[name + "::b"], entry["b_dtype"])
      m = _from_numpy(tensors[name + "::magnitude"], entry["magnitude_dtype"])
      out.append(dora.DoraWeight(base, a, b, m, alpha=entry["alpha"],
                                 rslora=entry["rslora"], layout=entry["layout"]))
    else:
      out.append(_from_numpy(tensors[name], entry["base_dtype"]))
  return jax.tree_util.tree_unflatten(treedef, out)
