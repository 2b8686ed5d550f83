"""save_adapter / load_adapter: only what training changed, in one safetensors file.

The file holds the adapters' ``a`` and ``b`` and every ``LORA_FULL`` leaf as
tensors, and in its header (safetensors metadata) a JSON record of each
entry's kind, rank, alpha, base shape and dtype, the versions that wrote it,
and checksums of all of it (:mod:`integrity`). Loading checks every tensor
against its entry, the checksums, and every entry against the base params it
is applied to; a file that fails any check is refused naming its path.
"""

import json
import math
from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from xrapture._src.io import atomic
from xrapture._src.io import integrity
from xrapture._src.lora import lora_weight
from xrapture._src.transform import paths

LoraWeight = lora_weight.LoraWeight
FORMAT = "xrapture-adapter"
FORMAT_VERSION = 1
_META_KEY = "xrapture"
# The header fields and entry fields of files from xrapture 0.1.0, which have
# no checksum: in such a file, another field means a damaged field name.
_HEADER_FIELDS_0_1 = frozenset(
    {"format", "format_version", "xrapture_version", "jax_version", "entries"})


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


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _dtype(x: Any) -> np.dtype | None:
  """The dtype named ``x``, or None if ``x`` names none."""
  if not isinstance(x, str):
    return None
  try:
    return jnp.dtype(x)
  except TypeError:
    return None


def _float_dtype(x: Any) -> str | None:
  dtype = _dtype(x)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return "is not a floating-point dtype name"
  return None


def _any_dtype(x: Any) -> str | None:
  return None if _dtype(x) is not None else "is not a dtype name"


def _shape(min_ndim: int) -> Callable[[Any], str | None]:
  def check(x):
    if not (isinstance(x, list) and len(x) >= min_ndim
            and all(_is_int(d) and d >= 0 for d in x)):
      return f"is not a shape (a list of at least {min_ndim} sizes)"
    return None
  return check


# Entry fields by kind, each with its check (None: fine, else what is wrong).
_FIELDS = {
    "lora": {
        "rank": lambda x: None if _is_int(x) and x >= 1 else "is not an integer >= 1",
        "alpha": lambda x: None if (isinstance(x, (int, float)) and not isinstance(x, bool)
                                    and math.isfinite(x)) else "is not a finite number",
        "rslora": lambda x: None if isinstance(x, bool) else "is not true or false",
        "base_shape": _shape(2),
        "base_dtype": _float_dtype,
        "a_dtype": _float_dtype,
        "b_dtype": _float_dtype,
    },
    "full": {"base_shape": _shape(0), "base_dtype": _any_dtype},
}


def _stored_dtype(name: str) -> np.dtype:
  """The dtype safetensors holds for dtype ``name`` (bfloat16 as uint16 bits)."""
  return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(jnp.dtype(name))


def _tensor_names(name: str, entry: dict[str, Any]) -> dict[str, str]:
  """Tensor key in the file -> the entry field holding its dtype."""
  if entry["kind"] == "lora":
    return {name + "::a": "a_dtype", name + "::b": "b_dtype"}
  return {name: "base_dtype"}


def _lora_from_entry(entry: dict[str, Any], w: Any, a: Any, b: Any) -> LoraWeight:
  """The LoraWeight an entry describes (validates the factors' shapes)."""
  return LoraWeight(w, a, b, alpha=entry["alpha"], rslora=entry["rslora"])


def save_adapter(path: str, params: Any, lora_spec: Any) -> None:
  """Writes the trainable part of ``params`` to ``path`` atomically.

  Args:
    path: the file to write (``.safetensors`` by convention).
    params: adapted params (with LoraWeights).
    lora_spec: ``model.spec(base_params)``: ``LORA_FULL`` leaves are saved
      too, frozen ones are not.

  Raises:
    ValueError: ``lora_spec`` does not fit ``params``; ``params`` are base
      params (the spec gives a rank to a plain array), or nothing would be
      saved.
    OSError: the file could not be written (the message names it); an
      existing file at ``path`` is left as it was.
  """
  from xrapture import __version__  # pylint: disable=g-import-not-at-top
  flat_params, _ = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  if len(ranks) != len(flat_params):
    raise ValueError(
        f"lora_spec has {len(ranks)} entries but params have {len(flat_params)} "
        "parameters; pass model.spec(base_params) for these params.")
  tensors, entries, not_adapted = {}, {}, []
  for (path_, value), rank in zip(flat_params, ranks):
    if isinstance(value, LoraWeight):
      a, a_dtype = _to_numpy(value.a)
      b, b_dtype = _to_numpy(value.b)
      tensors[path_ + "::a"], tensors[path_ + "::b"] = a, b
      entries[path_] = dict(
          kind="lora", rank=int(value.rank), alpha=float(value.alpha),
          rslora=bool(value.rslora), base_shape=list(value.shape),
          base_dtype=jnp.dtype(value.dtype).name, a_dtype=a_dtype, b_dtype=b_dtype)
    elif rank == lora_weight.LORA_FULL:
      arr, dtype = _to_numpy(value)
      tensors[path_] = arr
      entries[path_] = dict(kind="full", base_shape=list(np.shape(value)),
                            base_dtype=dtype)
    elif rank > 0:
      not_adapted.append(path_)
  if not_adapted:
    raise ValueError(
        f"lora_spec gives {not_adapted} an adapter rank, but in params they are "
        "plain arrays, not LoraWeights: these look like base params. Pass the "
        "adapted (trained) params, from model.adapt(rng, base_params).")
  if not entries:
    raise ValueError(
        "params hold no LoraWeight and lora_spec trains no parameter in full: "
        "the adapter file would be empty. Pass the adapted (trained) params, "
        "from model.adapt(rng, base_params), with model.spec(base_params).")
  header = dict(format=FORMAT, format_version=FORMAT_VERSION,
                xrapture_version=__version__, jax_version=jax.__version__,
                entries=entries)
  header[integrity.KEY] = integrity.record(header, tensors)
  data = safetensors.numpy.save(tensors, metadata={_META_KEY: json.dumps(header)})
  try:
    atomic.atomic_write_bytes(path, data)
  except OSError as e:
    reason = e.strerror or str(e)
    if e.errno is None:
      raise OSError(f"{reason}: could not write adapter file {path}") from e
    raise OSError(e.errno, f"{reason}: could not write adapter file {path}") from e


def _check_entries(path: str, header: dict[str, Any],
                   tensors: dict[str, np.ndarray]) -> None:
  """Every entry well formed, with its tensors in the declared dtype and shape."""
  entries = header.get("entries")
  if not isinstance(entries, dict):
    raise ValueError(f"{path}: the header has no 'entries' record; the file is corrupt.")
  checked = integrity.KEY in header
  if not checked and set(header) - _HEADER_FIELDS_0_1:
    raise ValueError(
        f"{path} has no checksum but header fields "
        f"{sorted(set(header) - _HEADER_FIELDS_0_1)} that files without one "
        "never had: the file is corrupt (a damaged field name?).")
  owned = set()
  for name, entry in entries.items():
    where = f"{path}: header entry '{name}'"
    if not isinstance(entry, dict):
      raise ValueError(f"{where} is not a record; the file is corrupt.")
    kind = entry.get("kind")
    if kind not in _FIELDS:
      raise ValueError(f"{where} has kind {kind!r}; expected one of {sorted(_FIELDS)}.")
    fields = _FIELDS[kind]
    missing = [f for f in fields if f not in entry]
    if missing:
      raise ValueError(f"{where} lacks fields {missing}; the file is corrupt.")
    unknown = set(entry) - set(fields) - {"kind"}
    if not checked and unknown:
      raise ValueError(f"{where} has fields {sorted(unknown)} that files without a "
                       "checksum never had; the file is corrupt.")
    for field, check in fields.items():
      problem = check(entry[field])
      if problem:
        raise ValueError(f"{where}: field '{field}' = {entry[field]!r} {problem}.")
    keys = _tensor_names(name, entry)
    absent = [k for k in keys if k not in tensors]
    if absent:
      raise ValueError(f"{path} is inconsistent: its header lists '{name}' but "
                       f"tensors {absent} are missing (truncated or edited file?)")
    for key, dtype_field in keys.items():
      want = _stored_dtype(entry[dtype_field])
      if tensors[key].dtype != want:
        raise ValueError(
            f"{where}: tensor '{key}' is stored as {tensors[key].dtype}, but its "
            f"'{dtype_field}' {entry[dtype_field]!r} needs {want}.")
    if kind == "full" and list(tensors[name].shape) != entry["base_shape"]:
      raise ValueError(f"{where}: tensor '{name}' has shape {tensors[name].shape}, "
                       f"the entry's base_shape is {tuple(entry['base_shape'])}.")
    if kind == "lora":
      w = jax.ShapeDtypeStruct(tuple(entry["base_shape"]), entry["base_dtype"])
      try:
        lora = _lora_from_entry(entry, w, tensors[name + "::a"], tensors[name + "::b"])
      except ValueError as e:
        raise ValueError(f"{where}: its factors do not fit base_shape "
                         f"{tuple(entry['base_shape'])}: {e}") from e
      if lora.rank != entry["rank"]:
        raise ValueError(f"{where}: factors of rank {lora.rank}, the entry's rank is "
                         f"{entry['rank']}.")
    owned.update(keys)
  stray = sorted(set(tensors) - owned)
  if stray:
    raise ValueError(f"{path} holds tensors {stray} that no header entry lists; "
                     "the file is corrupt or was edited.")


def _check_checksum(path: str, header: dict[str, Any],
                    tensors: dict[str, np.ndarray]) -> None:
  if integrity.KEY not in header:
    warnings.warn(
        f"{path} has no checksum (saved by xrapture 0.1.0?), so damage to it "
        "cannot be detected. Save it again with xrapture.save_adapter to add one.",
        UserWarning, stacklevel=4)
    return
  found = integrity.problems(header, tensors)
  if found:
    raise ValueError(
        f"{path} does not match its checksum: the file is corrupt or was edited.\n  "
        + "\n  ".join(found)
        + "\nRestore it from a copy, or save the adapter again.")


def read_adapter(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The header record and raw tensors of an adapter file, verified.

  Raises:
    ValueError: the file is truncated, corrupt, edited or not an xrapture
      adapter (the message names the file and what is wrong).
    FileNotFoundError: there is no file at ``path``.
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
  try:
    header = json.loads(metadata[_META_KEY])
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: its xrapture header is not valid JSON ({e}); the "
                     "file is corrupt.") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: its xrapture header is not a record; the file is corrupt.")
  version = header.get("format_version")
  if header.get("format") != FORMAT or not _is_int(version) or version > FORMAT_VERSION:
    raise ValueError(f"{path}: unsupported adapter format {header.get('format')!r} "
                     f"version {version!r}")
  try:
    _check_entries(path, header, tensors)
    _check_checksum(path, header, tensors)
  except (KeyError, TypeError, AttributeError, IndexError) as e:  # a check missed
    raise ValueError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
  return header, tensors


def load_adapter(path: str, base_params: Any) -> Any:
  """Applies the adapter file at ``path`` to ``base_params``.

  Returns:
    params like ``base_params`` with LoraWeights (and full-trained leaves)
    restored; nothing else changes.

  Raises:
    ValueError: the file is unreadable, damaged (it fails its checksum or a
      tensor does not fit its header entry: the message names the file and
      the entry), or does not fit ``base_params``: the message names every
      path that is missing or whose shape or dtype differs, with both
      shapes. Nothing is partially applied.

  A file without a checksum (from xrapture 0.1.0) loads with a warning.
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
    base = base.w if isinstance(base, LoraWeight) else base
    shape, dtype = tuple(np.shape(base)), jnp.dtype(base.dtype).name
    if shape != tuple(entry["base_shape"]) or dtype != entry["base_dtype"]:
      problems.append(f"'{name}' was {tuple(entry['base_shape'])} {entry['base_dtype']} "
                      f"there and is {shape} {dtype} here")
  if problems:
    raise ValueError(
        f"{path} was saved for another base ({len(problems)} mismatches):\n  "
        + "\n  ".join(problems) + "\nBase parameters:\n" + paths.describe(base_params))
  out = []
  for name, base in flat:
    if isinstance(base, LoraWeight):
      base = base.w
    entry = entries.get(name)
    if entry is None:
      out.append(base)
    elif entry["kind"] == "lora":
      a = _from_numpy(tensors[name + "::a"], entry["a_dtype"])
      b = _from_numpy(tensors[name + "::b"], entry["b_dtype"])
      out.append(_lora_from_entry(entry, base, a, b))
    else:
      out.append(_from_numpy(tensors[name], entry["base_dtype"]))
  return jax.tree_util.tree_unflatten(treedef, out)
