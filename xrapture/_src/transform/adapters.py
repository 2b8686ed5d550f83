"""From base params to adapted params and back: lora spec trees, init, merge, split."""

from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src import pytypes
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import config as config_lib
from xrapture._src.transform import layout as layout_lib
from xrapture._src.transform import paths
from xrapture._src.transform import pissa

LoraWeight = lora_weight.LoraWeight
LORA_FREEZE = lora_weight.LORA_FREEZE
LORA_FULL = lora_weight.LORA_FULL


def lora_spec_from_config(params: Any, config: ml_collections.ConfigDict,
                          layouts: dict[int, layout_lib.KernelLayout] | None = None
                          ) -> Any:
  """The lora spec tree of ``params`` under ``config``.

  Args:
    params: base params.
    config: the ConfigDict.
    layouts: flat leaf index -> how ``apply`` uses that parameter (from
      :func:`layout.kernel_layouts`); gives each kernel's rank limit
      ``min(prod(in), prod(out))``, tells a ``[L, D]`` layer-stack bias (one
      scanned axis) from a kernel, and decides ``"all-linear"``. Leaves
      missing here are taken by shape: leading axes stacked, the last two
      in and out.

  Returns:
    A tree like ``params`` holding, per parameter, its adapter rank (> 0),
    ``LORA_FULL`` (trained in full) or ``LORA_FREEZE``.

  Raises:
    ValueError: a field of ``config`` is invalid (:func:`config.validate`);
      ``targets`` match no kernel (the message lists the
      parameters that exist); a rank exceeds a kernel's
      ``min(prod(in), prod(out))``; an integer parameter is targeted; a
      targeted kernel is a grouped conv's, or is used in two incompatible
      ways; ``"all-linear"`` without ``layouts``.
  """
  config_lib.validate(config)
  flat, treedef = paths.flatten_with_paths(params)
  decisions = []
  layouts = layouts or {}
  all_linear = config_lib.all_linear(config.targets)
  if all_linear and not layouts and any(np.ndim(v) >= 2 for _, v in flat):
    raise ValueError(
        'targets=("all-linear",) needs to see how apply uses each kernel: pass '
        "the example inputs (model.adapt(rng, params, *inputs) / "
        "model.lora_spec(params, *inputs)).")
  grouped, conflicts = [], []
  for index, (path, value) in enumerate(flat):
    shape = tuple(np.shape(value))
    layout = layouts.get(index) or layout_lib.default(len(shape))
    core_ndim = len(shape) - layout.scanned
    dtype = np.dtype(value.dtype)
    named = config_lib.matches_any(config.targets, path)
    linear = (all_linear and core_ndim >= 2 and layout.low_rank
              and jnp.issubdtype(dtype, jnp.inexact)
              and any(u in layout_lib.LINEAR_USES for u in layout.uses))
    full = config_lib.matches_any(config.full, path)
    if (named or full) and not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"Parameter '{path}' has integer dtype {dtype} and cannot be trained, "
          "but the config's targets/full patterns match it. Narrow the patterns.")
    rank = config_lib.rank_for(config, path)
    if full:
      decisions.append(LORA_FULL)
    elif (named or linear) and core_ndim >= 2:
      limit = layout.rank_limit(shape)
      if rank > limit and not named:
        decisions.append(LORA_FREEZE)  # all-linear skips scalar heads
        continue
      if named and layout.grouped_conv:
        grouped.append(f"'{path}' {shape}")
      if named and layout.conflict:
        conflicts.append(f"'{path}' {shape}: {layout.conflict}")
      if rank > limit:
        m, n = lora_weight.grouped_shape(shape, layout.layout)
        raise ValueError(
            f"rank {rank} for '{path}' exceeds min(M, N) = {limit} of its kernel "
            f"of shape {shape}, which apply contracts as a [{m}, {n}] matrix "
            f"(layout '{layout.layout}'). Lower config.rank or add a "
            "config.rank_pattern entry for this path.")
      decisions.append(max(rank, LORA_FREEZE))
    elif core_ndim < 2 and config.tune_vectors and jnp.issubdtype(dtype, jnp.inexact):
      decisions.append(LORA_FULL)
    else:
      decisions.append(LORA_FREEZE)
  if grouped:
    raise ValueError(
        "These kernels are used by a grouped or depthwise conv "
        "(feature_group_count > 1), which has no low-rank form: "
        + ", ".join(grouped) + ". Exclude them from config.targets (or train them "
        "in full with config.full).")
  if conflicts:
    raise ValueError(
        "These kernels are used in two ways that group their axes differently, "
        "so no one adapter layout fits both:\n  " + "\n  ".join(conflicts)
        + "\nExclude them from config.targets (or train them in full with config.full).")
  if config.targets and not any(d > 0 for d in decisions):
    raise ValueError(
        f"config.targets {tuple(config.targets)} match no parameter with two or more "
        "dimensions (patterns are re.fullmatch-ed against 'module/param' "
        "paths; \"all-linear\" takes every kernel apply contracts; 1-D "
        "parameters never get adapters). Parameters:\n"
        + paths.describe(params))
  return jax.tree_util.tree_unflatten(treedef, decisions)


def layouts_needed(params: Any, config: ml_collections.ConfigDict, *,
                   vectors: bool, quantized: bool) -> list[str]:
  """Parameters a lora spec or adapt can only get right from their layouts.

  Without layouts from use, :func:`lora_spec_from_config` takes each
  parameter by its shape: leading axes stacked, the last two in and out, so
  a 2-D kernel is ``[in, out]`` and ``[L, D]`` is a kernel, not a layer
  stack's vectors. These are the parameters where that is a guess that
  decides something.

  Args:
    params: base params.
    config: the ConfigDict (valid).
    vectors: whether what ``tune_vectors`` trains counts (a lora spec).
    quantized: whether what ``quantize_frozen`` quantizes counts (adapt).

  Returns:
    ``"'path' (shape): why"`` for each floating-point parameter that is
    targeted with more than two dimensions (a conv window, a layer stack, a
    multi-axis kernel: which axes form the matrix shows in use), and, with
    ``vectors`` and ``config.tune_vectors``, each untargeted one of two or
    more dimensions that ``full`` does not name (trained in full if it is a
    layer stack's ``[L, D]`` vectors), and with ``quantized`` each of two or
    more dimensions that ``quantize_frozen`` names and neither a target nor
    ``full`` does
    (not quantized if it is a layer stack's vectors).
  """
  needed = []
  tune = vectors and config.tune_vectors
  frozen = quantized and config.quantize is not None and config.quantize_frozen
  for path, value in paths.flatten_with_paths(params)[0]:
    shape = tuple(np.shape(value))
    if len(shape) < 2 or not jnp.issubdtype(np.dtype(value.dtype), jnp.inexact):
      continue
    full = config_lib.matches_any(config.full, path)
    named = config_lib.matches_any(config.targets, path) and not full
    if named and len(shape) > 2:
      why = ("targeted, with more than two dimensions (a conv, a layer stack "
             "or a multi-axis kernel: its in and out axes show in use)")
    elif tune and not named and not full:
      why = "tune_vectors trains it in full if it is a layer stack's [L, D] vectors"
    elif (frozen and not named and not full
          and config_lib.matches_any(config.quantize_frozen, path)):
      why = "quantize_frozen quantizes it unless it is a layer stack's [L, D] vectors"
    else:
      continue
    needed.append(f"'{path}' {shape}: {why}")
  return needed


def report_uses(params: Any, lora_spec: Any,
                layouts: dict[int, layout_lib.KernelLayout]) -> None:
  """Warns once per adapted kernel with a use that cannot stay low-rank.

  In ``xrapture.strict_mode()`` raises ``MaterializationError`` instead.
  """
  flat, _ = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  for index, ((path, value), rank) in enumerate(zip(flat, ranks)):
    layout = layouts.get(index)
    if rank <= 0 or layout is None or not layout.problems:
      continue
    message = (
        f"The LoraWeight of '{path}' {tuple(np.shape(value))} will be "
        f"materialized: apply uses it through {'; '.join(layout.problems)}. "
        "Exclude it from config.targets (or train it in full with config.full) to "
        "keep training low-rank.")
    if registry.is_strict():
      raise registry.MaterializationError(message + " (strict mode is on)")
    warnings.warn(message, registry.MaterializationWarning, stacklevel=3)


def init_lora_weight(rng: jax.Array, w: jax.Array, rank: int, alpha: float,
                     layout: layout_lib.KernelLayout | str, stddev: float,
                     dtype: Any = None, rslora: bool = False) -> LoraWeight:
  """A LoraWeight around ``w`` with ``b = 0`` and ``a ~ N(0, stddev²)``.

  Args:
    rng: key for ``a``.
    w: the base kernel.
    rank: ``r``.
    alpha: LoRA alpha.
    layout: a :class:`layout.KernelLayout` or a layout string.
    stddev: ``a``'s standard deviation.
    dtype: the factors' dtype (default ``w``'s).
    rslora: scale by ``alpha / sqrt(r)``.
  """
  dtype = w.dtype if dtype is None else jnp.dtype(dtype)
  if isinstance(layout, layout_lib.KernelLayout):
    layout = layout.layout
  a_shape, b_shape = lora_weight.factor_shapes(tuple(w.shape), layout, rank)
  a = (stddev * jax.random.normal(rng, a_shape)).astype(dtype)
  b = jnp.zeros(b_shape, dtype)
  return LoraWeight(w, a, b, alpha=float(alpha), rslora=bool(rslora), layout=layout)


def adapt_params(rng: jax.Array, params: Any, lora_spec: Any,
                 config: ml_collections.ConfigDict,
                 layouts: Callable[[list[int]], dict[int, layout_lib.KernelLayout]]
                 ) -> Any:
  """Wraps each leaf with a rank > 0 in ``lora_spec`` in a fresh LoraWeight.

  ``layouts(wanted)`` gives the layouts of the adapted kernels (flat
  indices ``wanted``) that it knows; others get 0.1.0's (leading axes
  stacked, then in, out).
  """
  flat, treedef = paths.flatten_with_paths(params)
  ranks = jax.tree_util.tree_leaves(lora_spec)
  if len(ranks) != len(flat):
    raise ValueError(f"lora_spec has {len(ranks)} leaves, params {len(flat)}")
  need_trace = [i for i, ((_, v), r) in enumerate(zip(flat, ranks))
                if r > 0 and np.ndim(v) >= 2]
  found = layouts(need_trace) if need_trace else {}
  keys = jax.random.split(rng, len(flat))
  out = []
  for i, ((path, value), rank) in enumerate(zip(flat, ranks)):
    if rank <= 0:
      out.append(value)
      continue
    layout = found.get(i) or layout_lib.default(np.ndim(value))
    lora = init_lora_weight(
        keys[i], value, rank, config_lib.alpha_for(config, path), layout,
        config.init_stddev, config.dtype, config.rslora)
    lora = pissa.initialize(lora, config.get("init", "default"))
    out.append(dora.from_lora(lora) if config.get("use_dora", False) else lora)
  return jax.tree_util.tree_unflatten(treedef, out)


_merge = jax.jit(lambda x: implicit_array.materialize_nested(x))
_merge_donating = jax.jit(lambda x: implicit_array.materialize_nested(x),
                          donate_argnums=0)


def merge_params(params: pytypes.Params, destructive: bool = False) -> pytypes.Params:
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

  Examples:
    >>> import jax.numpy as jnp, xrapture
    >>> lora = xrapture.LoraWeight(jnp.eye(2), jnp.ones((1, 2)), jnp.ones((2, 1)))
    >>> merged = xrapture.merge_params({"linear": {"w": lora, "b": jnp.zeros(2)}})
    >>> print(merged["linear"]["w"])  # eye(2) + (1 / 1) · b @ a
    [[2. 1.]
     [1. 2.]]
  """
  merge = _merge_donating if destructive else _merge
  with warnings.catch_warnings():
    # Only w's buffer can hold the merged kernel; a and b are freed unused.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    return implicit_array.tree_map_with_implicit(
        lambda x: merge(x) if implicit_array.is_implicit(x) else x, params)


def split_lora_params(params: pytypes.Params, lora_spec: pytypes.LoraSpec) -> pytypes.Params:
  """The trainable part of ``params``, with ``EmptyNode`` elsewhere.

  Every LoraWeight keeps ``a`` and ``b`` (its ``w`` becomes EmptyNode; a
  DoraWeight also keeps its ``magnitude``),
  ``LORA_FULL`` leaves are kept, frozen leaves become EmptyNode. Use it to
  checkpoint only what training changed.
  """
  def one(rank, value):
    if dora.is_adapter(value):
      return implicit_array.map_fields(
          lambda name, x: implicit_array.EmptyNode if name == "w" else x, value)
    return value if rank == LORA_FULL else implicit_array.EmptyNode
  return jax.tree.map(one, lora_spec, params, is_leaf=lora_weight.is_spec_leaf)


def count_trainable(params: pytypes.Params, lora_spec: pytypes.LoraSpec) -> int:
  """Number of trainable numbers: adapter entries plus LORA_FULL leaves."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(split_lora_params(params, lora_spec)))
