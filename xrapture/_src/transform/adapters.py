"""From base params to adapted params and back: spec trees, init, merge, split."""

from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.lora import lora_weight
from xrapture._src.transform import layout as layout_lib
from xrapture._src.transform import paths
from xrapture._src.transform import spec as spec_lib

LoraWeight = lora_weight.LoraWeight
LORA_FREEZE = lora_weight.LORA_FREEZE
LORA_FULL = lora_weight.LORA_FULL


def lora_spec_from_config(params: Any, spec: ml_collections.ConfigDict,
                          scanned: dict[int, int] | None = None) -> Any:
  """The lora spec tree of ``params`` under ``spec``.

  Args:
    params: base params.
    spec: the ConfigDict.
    scanned: flat leaf index -> leading axes that scans slice off (from
      :func:`layout.kernel_layouts`); a ``[L, D]`` layer-stack bias with one
      scanned axis is a vector. Missing entries count as 0.

  Returns:
    A tree like ``params`` holding, per parameter, its adapter rank (> 0),
    ``LORA_FULL`` (trained in full) or ``LORA_FREEZE``.

  Raises:
    ValueError: a field of ``spec`` is invalid (:func:`spec.validate`);
      ``targets`` match no parameter with two or more dimensions (the message
      lists the parameters that exist); a rank exceeds a kernel's
      ``min(M, N)``; an integer parameter is targeted.
  """
  spec_lib.validate(spec)
  flat, treedef = paths.flatten_with_paths(params)
  decisions = []
  scanned = scanned or {}
  for index, (path, value) in enumerate(flat):
    shape = tuple(np.shape(value))
    core_ndim = len(shape) - scanned.get(index, 0)
    dtype = np.dtype(value.dtype)
    targeted = spec_lib.matches_any(spec.targets, path)
    full = spec_lib.matches_any(spec.full, path)
    if (targeted or full) and not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"Parameter '{path}' has integer dtype {dtype} and cannot be trained, "
          "but the spec's targets/full patterns match it. Narrow the patterns.")
    if full:
      decisions.append(LORA_FULL)
    elif targeted and core_ndim >= 2:
      rank = spec_lib.rank_for(spec, path)
      if rank > min(shape[-2:]):
        raise ValueError(
            f"rank {rank} for '{path}' exceeds min(M, N) = {min(shape[-2:])} of "
            f"its kernel of shape {shape}. Lower spec.rank or add a "
            "spec.rank_pattern entry for this path.")
      decisions.append(max(rank, LORA_FREEZE))
    elif core_ndim < 2 and spec.tune_vectors and jnp.issubdtype(dtype, jnp.inexact):
      decisions.append(LORA_FULL)
    else:
      decisions.append(LORA_FREEZE)
  if spec.targets and not any(d > 0 for d in decisions):
    raise ValueError(
        f"spec.targets {tuple(spec.targets)} match no parameter with two or more "
        "dimensions (patterns are re.fullmatch-ed against 'module/param' "
        "paths; 1-D parameters never get adapters). Parameters:\n"
        + paths.describe(params))
  return jax.tree_util.tree_unflatten(treedef, decisions)


def init_lora_weight(rng: jax.Array, w: jax.Array, rank: int, alpha: float,
                     layout: layout_lib.KernelLayout, stddev: float,
                     dtype: Any = None, rslora: bool = False) -> LoraWeight:
  """A LoraWeight around ``w`` with ``b = 0`` and ``a ~ N(0, stddev²)``."""
  dtype = w.dtype if dtype is None else jnp.dtype(dtype)
  shape = tuple(w.shape)
  lead = shape[:layout.layers + layout.window]
  a_lead = shape[:layout.layers] + (1,) * layout.window
  m, n = shape[-2:]
  a = (stddev * jax.random.normal(rng, a_lead + (rank, n))).astype(dtype)
  b = jnp.zeros(lead + (m, rank), dtype)
  return LoraWeight(w, a, b, alpha=float(alpha), rslora=bool(rslora))


def adapt_params(rng: jax.Array, params: Any, lora_spec: Any,
                 spec: ml_collections.ConfigDict,
                 layouts: Callable[[list[int]], dict[int, layout_lib.KernelLayout]]
                 ) -> Any:
  """Wraps each leaf with a rank > 0 in ``lora_spec`` in a fresh LoraWeight."""
  flat, treedef = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  if len(ranks) != len(flat):
    raise ValueError(f"lora_spec has {len(ranks)} leaves, params {len(flat)}")
  need_trace = [i for i, ((_, v), r) in enumerate(zip(flat, ranks))
                if r > 0 and np.ndim(v) > 2]
  found = layouts(need_trace) if need_trace else {}
  keys = jax.random.split(rng, len(flat))
  out = []
  for i, ((path, value), rank) in enumerate(zip(flat, ranks)):
    if rank <= 0:
      out.append(value)
      continue
    layout = found.get(i, layout_lib.stacked(np.ndim(value)))
    out.append(init_lora_weight(
        keys[i], value, rank, spec_lib.alpha_for(spec, path), layout,
        spec.init_stddev, spec.dtype, spec.rslora))
  return jax.tree_util.tree_unflatten(treedef, out)


_merge = jax.jit(lambda x: implicit_array.materialize_nested(x))
_merge_donating = jax.jit(lambda x: implicit_array.materialize_nested(x),
                          donate_argnums=0)


def merge_params(params: Any, destructive: bool = False) -> Any:
  """Replaces every LoraWeight by its dense ``w + scale · b @ a``.

  Args:
    params: adapted params.
    destructive: donate the LoraWeights' buffers to the merged arrays (the
      inputs must not be used afterwards); halves peak memory on devices
      that support donation.

  Returns:
    Plain arrays that ``hk.transform(f).apply`` accepts; other leaves are
    returned as the same objects. A quantized base (QLoRA) is dequantized:
    the merged params are full precision, as are frozen quantized kernels
    (:func:`xrapture.merge_and_requantize` keeps them quantized).
  """
  merge = _merge_donating if destructive else _merge
  with warnings.catch_warnings():
    # Only w's buffer can hold the merged kernel; a and b are freed unused.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return implicit_array.tree_map_with_implicit(
        lambda x: merge(x) if implicit_array.is_implicit(x) else x, params)


def split_lora_params(params: Any, lora_spec: Any) -> Any:
  """The trainable part of ``params``, with ``EmptyNode`` elsewhere.

  Every LoraWeight keeps ``a`` and ``b`` (its ``w`` becomes EmptyNode),
  ``LORA_FULL`` leaves are kept, frozen leaves become EmptyNode. Use it to
  checkpoint only what training changed.
  """
  def one(rank, value):
    if isinstance(value, LoraWeight):
      return implicit_array.map_fields(
          lambda name, x: implicit_array.EmptyNode if name == "w" else x, value)
    return value if rank == LORA_FULL else implicit_array.EmptyNode
  return jax.tree.map(one, lora_spec, params, is_leaf=lora_weight.is_spec_leaf)


def count_trainable(params: Any, lora_spec: Any) -> int:
  """Number of trainable numbers: adapter entries plus LORA_FULL leaves."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(split_lora_params(params, lora_spec)))
