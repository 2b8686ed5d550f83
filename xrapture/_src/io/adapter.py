"""save_adapter / load_adapter: only what training changed, in one safetensors file.

The file holds the adapters' ``a`` and ``b`` (and a DoRA adapter's
``magnitude``) and every ``LORA_FULL`` leaf as
tensors, and in its header (safetensors metadata) a JSON record of each
entry's kind, rank, alpha, layout, base shape and dtype, the versions that
wrote it, and checksums of all of it (:mod:`integrity`); 0.1.0's files have
no layout and are read in 0.1.0's. Loading checks every tensor against its
entry, the checksums, and every entry against the base params it is applied
to; a file that fails any check is refused naming its path.

An adapter whose kernel is a residual (PiSSA: ``model.adapt`` replaced the
kernel ``W`` by ``W - s·b₀@a₀``) fits that residual only; on ``W`` it would
compute something else without any error. Its entry records a sample of the
residual (64 values at spread positions, as float32), and loading compares
the sample with the kernel it is given, up to rounding: a cheap check even
for kernels of gigabytes (a quantized kernel is dequantized for it), which
tells the residual from the original since they differ by the adapter's
whole initial update. Ordinary adapters carry
no sample and load onto any kernel of their shape and dtype (an adapter
trained on a quantized base onto the float one: QLoRA). Files with a sample
are format version 2, which 0.1.0 refuses rather than misapplies; others
stay version 1.
"""

import json
import math
from typing import Any, Callable, TypeGuard
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from xrapture._src import pytypes
from xrapture._src.implicit import implicit_array
from xrapture._src.io import atomic
from xrapture._src.io import integrity
from xrapture._src.io import multihost
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.quant import quantize as quantize_lib
from xrapture._src.quant import quantized_array
from xrapture._src.transform import paths
from xrapture._src.transform import pissa

LoraWeight = lora_weight.LoraWeight
FORMAT = "xrapture-adapter"
# The newest version read. Files are written as version 1 (0.1.0's, which it
# reads) unless an entry has a residual record (version 2).
FORMAT_VERSION = 2
_PLAIN_VERSION = 1
_RESIDUAL = "residual"
_SAMPLES = 64
_META_KEY = "xrapture"
# The header fields and entry fields of files from xrapture 0.1.0, which have
# no checksum: in such a file, another field means a damaged field name.
_HEADER_FIELDS_0_1 = frozenset(
    {"format", "format_version", "xrapture_version", "jax_version", "entries"})


def _to_numpy(x: Any) -> tuple[np.ndarray, str]:
  """Array -> (array safetensors can store, dtype name to restore)."""
  arr = multihost.to_numpy(x)
  name = jnp.dtype(arr.dtype).name
  if name == "bfloat16":
    return arr.view(np.uint16), name
  return arr, name


def _from_numpy(arr: np.ndarray, name: str) -> jax.Array:
  if name == "bfloat16":
    return jnp.asarray(arr.view(jnp.bfloat16))
  return jnp.asarray(arr)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> TypeGuard[int]:
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
        "alpha": lambda x: None if _is_number(x) else "is not a finite number",
        "rslora": lambda x: None if isinstance(x, bool) else "is not true or false",
        "base_shape": _shape(2),
        "base_dtype": _float_dtype,
        "a_dtype": _float_dtype,
        "b_dtype": _float_dtype,
    },
    "full": {"base_shape": _shape(0), "base_dtype": _any_dtype},
}


def _layout(x: Any) -> str | None:
  if isinstance(x, str) and x and not set(x) - set("sio") and "i" in x and "o" in x:
    return None
  return "is not a layout (one of 's', 'i', 'o' per kernel axis)"


def _quantization(x: Any) -> str | None:
  if x is None:
    return None
  if not (isinstance(x, dict)
          and set(x) == {"scheme", "block_size", "axis", "double_quant"}
          and x["scheme"] in quantized_array.SCHEMES and _is_int(x["block_size"])
          and x["block_size"] >= 1 and x["axis"] in (-2, -1)
          and isinstance(x["double_quant"], bool)):
    return "is not a quantization record (scheme, block_size, axis, double_quant)"
  return None


def _residual(x: Any) -> str | None:
  """A residual record: the kernel's values at flat positions, and its quantization."""
  if not (isinstance(x, dict) and set(x) == {"positions", "values", "quantized"}):
    return "is not a residual record (positions, values, quantized)"
  positions, values = x["positions"], x["values"]
  if not (isinstance(positions, list) and positions
          and all(_is_int(p) and p >= 0 for p in positions)
          and isinstance(values, list) and len(values) == len(positions)
          and all(_is_number(v) for v in values)):
    return ("does not hold one finite value per position (a non-empty list of "
            "integers >= 0)")
  problem = _quantization(x["quantized"])
  return None if problem is None else f"has a 'quantized' field that {problem}"


# Fields an entry may lack: files from 0.1.0 have no layout (read as 0.1.0's);
# only adapters of a residual kernel (PiSSA) have a residual record.
_OPTIONAL_FIELDS = {"lora": {"layout": _layout, _RESIDUAL: _residual},
                    "dora": {_RESIDUAL: _residual}}
# DoRA entries (xrapture.DoraWeight): a LoRA entry plus the magnitude vector.
_FIELDS["dora"] = dict(_FIELDS["lora"], magnitude_dtype=_float_dtype, layout=_layout)


def _stored_dtype(name: str) -> np.dtype:
  """The dtype safetensors holds for dtype ``name`` (bfloat16 as uint16 bits)."""
  return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(jnp.dtype(name))


def _tensor_names(name: str, entry: dict[str, Any]) -> dict[str, str]:
  """Tensor key in the file -> the entry field holding its dtype."""
  if entry["kind"] == "lora":
    return {name + "::a": "a_dtype", name + "::b": "b_dtype"}
  if entry["kind"] == "dora":
    return {name + "::a": "a_dtype", name + "::b": "b_dtype",
            name + "::magnitude": "magnitude_dtype"}
  return {name: "base_dtype"}


def _lora_from_entry(entry: dict[str, Any], w: Any, a: Any, b: Any) -> LoraWeight:
  """The LoraWeight an entry describes (validates the factors' shapes).

  No layout: a 0.1.0 file, whose factors LoraWeight rearranges.
  """
  return LoraWeight(w, a, b, alpha=entry["alpha"], rslora=entry["rslora"],
                    layout=entry.get("layout"), residual=_RESIDUAL in entry)


def _positions(shape: tuple[int, ...]) -> np.ndarray:
  """Up to ``_SAMPLES`` flat indices of a kernel: one in each of as many equal
  stretches, at an offset that varies, so they do not share one column."""
  size = math.prod(shape)
  k = min(_SAMPLES, size)
  stride = size // k
  i = np.arange(k)
  return i * stride + (i * 7919) % stride


def _values(w: Any, positions: np.ndarray) -> np.ndarray:
  """The float32 values of kernel ``w`` (dense or quantized) at flat ``positions``.

  A collective if ``w`` spans processes (every process calls it).
  """
  if isinstance(w, np.ndarray):
    return w.reshape(-1)[positions].astype(np.float32)
  if implicit_array.is_implicit(w):
    w = w.materialize()
  return multihost.to_numpy(jnp.ravel(w)[positions]).astype(np.float32)


def _residual_record(w: Any) -> dict[str, Any]:
  """What a file keeps of residual kernel ``w`` to recognize it at load."""
  positions = _positions(tuple(w.shape))
  quantized = None
  if isinstance(w, quantized_array.QuantizedArray):
    quantized = dict(scheme=w.scheme, block_size=int(w.block_size), axis=int(w.axis),
                     double_quant=bool(w.double_quant))
  return dict(positions=positions.tolist(),
              values=[float(v) for v in _values(w, positions)], quantized=quantized)


def _is_residual_of(record: dict[str, Any], w: Any, dtype: str) -> bool:
  """Whether kernel ``w`` is the one ``record`` sampled, up to rounding.

  A float kernel is quantized first if the recorded one was (an adapter
  trained on the quantized residual fits the float residual, as in QLoRA). A
  residual recomputed elsewhere may round (or quantize) a few values the
  other way: the largest eighth of the differences is left out; the rest
  must be within ``max(1e-3, eps)`` of the values' root mean square.
  """
  q = record["quantized"]
  if q is not None and not implicit_array.is_implicit(w):
    w = quantize_lib.quantize_array(w, q["scheme"], block_size=q["block_size"],
                                    double_quant=q["double_quant"], axis=q["axis"])
  saved = np.asarray(record["values"], np.float64)
  here = _values(w, np.asarray(record["positions"])).astype(np.float64)
  diff = np.sort(np.abs(here - saved))[:len(saved) - len(saved) // 8]
  rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
  tolerance = max(1e-3, float(jnp.finfo(dtype).eps))
  return rms(diff) <= tolerance * max(rms(saved), rms(here))


def save_adapter(path: str, params: pytypes.Params, lora_spec: pytypes.LoraSpec, *,
                 initial: pytypes.Params | None = None) -> None:
  """Writes the trainable part of ``params`` to ``path`` atomically.

  In a multi-process run every process calls it; process 0 writes, and each
  process returns once the file is written.

  Adapters of a residual kernel (PiSSA, ``init='pissa'``: the LoraWeight is
  marked ``residual``) fit that residual only: the file records a sample of
  it, and :func:`load_adapter` refuses other kernels, such as the original
  base. Pass ``initial`` for a file that fits the original base instead.

  Args:
    path: the file to write (``.safetensors`` by convention).
    params: adapted params (with LoraWeights).
    lora_spec: ``model.lora_spec(base_params)``: ``LORA_FULL`` leaves are saved
      too, frozen ones are not.
    initial: for adapters initialized with PiSSA: the params ``model.adapt``
      returned, before training. Each adapter is then saved as plain LoRA
      relative to the original base (``w_residual + s·b₀@a₀``), as
      :func:`xrapture.export_peft` and PEFT's
      ``save_pretrained(path_initial_model_for_weight_conversion=...)`` do:
      rank ``2r`` factors ``[b | b₀]``, ``[a; -a₀]``, alpha doubled; load it
      onto the original base params.

  Raises:
    ValueError: ``lora_spec`` does not fit ``params``; ``params`` are base
      params (the lora spec gives a rank to a plain array), or nothing would be
      saved; ``initial`` is not these params' starting point, or is given
      for DoRA adapters.
    OSError: the file could not be written (the message names it); an
      existing file at ``path`` is left as it was.

  Examples:
    >>> import os, tempfile
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> config = xrapture.default_config()
    >>> config.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(4)(x), config)
    >>> x = jnp.ones([1, 8])
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> params = model.adapt(jax.random.PRNGKey(1), base)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "adapter.safetensors")
    >>> xrapture.save_adapter(path, params, model.lora_spec(base))
    >>> loaded = xrapture.load_adapter(path, base)
    >>> loaded["linear"]["w"].rank, loaded["linear"]["w"].alpha
    (2, 16.0)
    >>> bool((loaded["linear"]["w"].a == params["linear"]["w"].a).all())
    True
    >>> tmp.cleanup()
  """
  from xrapture._src.version import __version__  # pylint: disable=g-import-not-at-top
  flat_params, _ = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  if len(ranks) != len(flat_params):
    raise ValueError(
        f"lora_spec has {len(ranks)} entries but params have {len(flat_params)} "
        "parameters; pass model.lora_spec(base_params) for these params.")
  starts = None if initial is None else dict(paths.flatten_with_paths(initial)[0])
  tensors, entries, not_adapted = {}, {}, []
  for (path_, value), rank in zip(flat_params, ranks):
    if dora.is_adapter(value):
      if starts is not None:
        value = pissa.plain_for_original(path_, value, starts)
      a, a_dtype = _to_numpy(value.a)
      b, b_dtype = _to_numpy(value.b)
      tensors[path_ + "::a"], tensors[path_ + "::b"] = a, b
      entries[path_] = dict(
          kind="lora", rank=int(value.rank), alpha=float(value.alpha),
          rslora=bool(value.rslora), layout=lora_weight.layout_of(value),
          base_shape=list(value.shape),
          base_dtype=jnp.dtype(value.dtype).name, a_dtype=a_dtype, b_dtype=b_dtype)
      if isinstance(value, dora.DoraWeight):
        m, m_dtype = _to_numpy(value.magnitude)
        tensors[path_ + "::magnitude"] = m
        entries[path_].update(kind="dora", magnitude_dtype=m_dtype,
                              layout=value.layout)
      if value.residual:
        entries[path_][_RESIDUAL] = _residual_record(value.w)
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
        "from model.adapt(rng, base_params), with model.lora_spec(base_params).")
  residual = any(_RESIDUAL in entry for entry in entries.values())
  header = dict(format=FORMAT,
                format_version=FORMAT_VERSION if residual else _PLAIN_VERSION,
                xrapture_version=__version__, jax_version=jax.__version__,
                entries=entries)
  header[integrity.KEY] = integrity.record(header, tensors)
  data = safetensors.numpy.save(tensors, metadata={_META_KEY: json.dumps(header)})

  def write():
    try:
      atomic.atomic_write_bytes(path, data)
    except OSError as e:
      reason = e.strerror or str(e)
      if e.errno is None:
        raise OSError(f"{reason}: could not write adapter file {path}") from e
      raise OSError(e.errno, f"{reason}: could not write adapter file {path}") from e
  multihost.write_once(write, path)


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
  owned: set[str] = set()
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
    unknown = set(entry) - set(fields) - set(_OPTIONAL_FIELDS.get(kind, {})) - {"kind"}
    if not checked and unknown:
      raise ValueError(f"{where} has fields {sorted(unknown)} that files without a "
                       "checksum never had; the file is corrupt.")
    present = dict(fields, **{f: c for f, c in _OPTIONAL_FIELDS.get(kind, {}).items()
                              if f in entry})
    for field, check in present.items():
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
    if kind in ("lora", "dora"):
      w = jax.ShapeDtypeStruct(tuple(entry["base_shape"]), entry["base_dtype"])
      try:
        lora = _lora_from_entry(entry, w, tensors[name + "::a"], tensors[name + "::b"])
      except ValueError as e:
        raise ValueError(f"{where}: its factors do not fit base_shape "
                         f"{tuple(entry['base_shape'])}: {e}") from e
      if lora.rank != entry["rank"]:
        raise ValueError(f"{where}: factors of rank {lora.rank}, the entry's rank is "
                         f"{entry['rank']}.")
      if _RESIDUAL in entry:
        size = math.prod(entry["base_shape"])
        if max(entry[_RESIDUAL]["positions"]) >= size:
          raise ValueError(f"{where}: its residual record samples positions beyond "
                           f"the {size} values of base_shape "
                           f"{tuple(entry['base_shape'])}; the file is corrupt.")
      if kind == "dora":
        stacked, _, out = lora_weight.groups(lora_weight.layout_of(lora))
        want_shape = tuple(entry["base_shape"][d] for d in stacked + out)
        if tuple(tensors[name + "::magnitude"].shape) != want_shape:
          raise ValueError(f"{where}: magnitude of shape "
                           f"{tuple(tensors[name + '::magnitude'].shape)}, "
                           f"expected {want_shape}.")
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
  if integrity.KEY not in header and version != _PLAIN_VERSION:
    raise ValueError(f"{path}: a version {version} adapter file without its checksum "
                     "record; the file is corrupt.")
  try:
    _check_entries(path, header, tensors)
    _check_checksum(path, header, tensors)
  except (KeyError, TypeError, AttributeError, IndexError) as e:  # a check missed
    raise ValueError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
  return header, tensors


def _check_residuals(path: str, entries: dict[str, Any], by_path: dict[str, Any]) -> None:
  """Adapters of a residual kernel (PiSSA) go onto that residual, and only they do."""
  others, plain = [], []
  for name, entry in entries.items():
    if entry["kind"] == "full":
      continue
    here = by_path[name]
    kernel = here.w if dora.is_adapter(here) else here
    if _RESIDUAL in entry:
      if not _is_residual_of(entry[_RESIDUAL], kernel, entry["base_dtype"]):
        quantized = (implicit_array.is_implicit(kernel)
                     and entry[_RESIDUAL]["quantized"] is None)
        others.append(f"'{name}'" + (" (quantized here, not in training: load onto the "
                                      "float residual, then quantize)" if quantized else ""))
    elif dora.is_adapter(here) and here.residual:
      plain.append(f"'{name}'")
  if others:
    raise ValueError(
        f"{path} holds PiSSA adapters (init='pissa'), trained on the residual "
        "kernels model.adapt left in place of the pretrained ones (W - s·b₀@a₀); "
        "they fit those residuals only, and these base params hold other kernels "
        f"(the original ones?) at {', '.join(others)}: the outputs would be wrong. "
        "Load the file onto the residual params, model.adapt(rng, base_params) "
        "with the config it was trained with; or save the trained params again as "
        "plain LoRA for the original base: save_adapter(path, params, lora_spec, "
        "initial=<the params model.adapt returned, before training>).")
  if plain:
    raise ValueError(
        f"{path} holds adapters for {', '.join(plain)} that were not trained on a "
        "residual kernel, but here these are PiSSA residuals (model.adapt with "
        "init='pissa' moved the kernels' top part into their adapters): the outputs "
        "would be wrong. Load the file onto the original base params.")


def load_adapter(path: str, base_params: pytypes.Params) -> pytypes.Params:
  """Applies the adapter file at ``path`` to ``base_params``.

  Returns:
    params like ``base_params`` with LoraWeights (and full-trained leaves)
    restored; nothing else changes.

  Raises:
    ValueError: the file is unreadable, damaged (it fails its checksum or a
      tensor does not fit its header entry: the message names the file and
      the entry), or does not fit ``base_params``: the message names every
      path that is missing or whose shape or dtype differs, with both
      shapes; or a PiSSA adapter (trained on a residual kernel) meets
      another kernel, such as the original base, or an ordinary adapter a
      residual: the message names the paths and the fixes. Nothing is
      partially applied.

  A file without a checksum (from xrapture 0.1.0) loads with a warning.

  Examples:
    See :func:`save_adapter`.
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
  _check_residuals(path, entries, by_path)
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
      out.append(_lora_from_entry(entry, base, a, b))
    elif entry["kind"] == "dora":
      a = _from_numpy(tensors[name + "::a"], entry["a_dtype"])
      b = _from_numpy(tensors[name + "::b"], entry["b_dtype"])
      m = _from_numpy(tensors[name + "::magnitude"], entry["magnitude_dtype"])
      out.append(dora.DoraWeight(base, a, b, m, alpha=entry["alpha"],
                                 rslora=entry["rslora"], layout=entry["layout"],
                                 residual=_RESIDUAL in entry))
    else:
      out.append(_from_numpy(tensors[name], entry["base_dtype"]))
  return jax.tree_util.tree_unflatten(treedef, out)
