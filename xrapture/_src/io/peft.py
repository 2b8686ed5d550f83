"""HuggingFace PEFT LoRA adapters: export to and import from PEFT's format.

A PEFT adapter directory holds ``adapter_model.safetensors`` and
``adapter_config.json``. Its tensors are keyed by torch module path, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so the
caller says which torch module each Haiku parameter is, with a ``name_map``.

Layouts (``s`` = alpha/r, or alpha/sqrt(r) with rsLoRA). A Haiku kernel
``w [in, out]`` computes ``x @ w``; its LoraWeight adds ``s · b @ a`` with
``b [in, r]`` and ``a [r, out]``. torch's ``nn.Linear`` holds ``W [out, in]``
and PEFT adds ``s · lora_B @ lora_A``, so ``lora_B @ lora_A = (b @ a)ᵀ =
aᵀ @ bᵀ``::

  nn.Linear      lora_A.weight [r, in]   = bᵀ     lora_B.weight [out, r] = aᵀ
  nn.Embedding   lora_embedding_A [r, V] = bᵀ     lora_embedding_B [D, r] = aᵀ
  nn.ConvNd      lora_A.weight [r, in, *k] = b [*k, in, r] with axes reversed
                 lora_B.weight [out, r, 1..] = a [1.., r, out] with axes reversed

DoRA adapters (:class:`xrapture.DoraWeight`) add PEFT's
``<module>.lora_magnitude_vector``: ``[out]`` for ``nn.Linear`` and
``nn.Embedding``, ``[1, out, 1..]`` for ``nn.ConvNd``, and ``"use_dora": true``.

``hk.Embed``'s table ``[V, D]`` and ``nn.Embedding``'s ``[V, D]`` have the same
layout, and PEFT's embedding update is ``s · Aᵀ @ Bᵀ``, hence the same rule.
For convolutions PEFT's ``lora_A`` is a conv with the base layer's window and
``lora_B`` a 1×1 conv; xrapture's matching layout is ``b`` spanning the window
and ``a`` pointwise (what :meth:`LoraTransformed.adapt` creates).
"""

import json
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence, Union
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy

from xrapture._src import deprecations
from xrapture._src.io import atomic
from xrapture._src.io import multihost
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import config as config_lib
from xrapture._src.transform import paths
from xrapture._src.transform import pissa

LoraWeight = lora_weight.LoraWeight
STACK, IN, OUT = lora_weight.STACK, lora_weight.IN, lora_weight.OUT

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PICKLE_NAME = "adapter_model.bin"  # torch.save format, which we do not read
_PREFIX = "base_model.model."
_LINEAR = ("lora_A.weight", "lora_B.weight")
_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")
_MAGNITUDE = "lora_magnitude_vector"

# A torch module path, or one per index of the kernel's leading (layer) axis
# for kernels stacked by hk.layer_stack.
TorchPath = Union[str, Sequence[str]]
NameMap = Union[Mapping[str, TorchPath], Callable[[str], TorchPath | None]]

# adapter_config.json fields whose non-default values change what the adapter
# computes in ways xrapture does not model. Value: the default that is fine.
_UNSUPPORTED = {
    "lora_bias": False,            # a bias on lora_B
    "layer_replication": None,     # duplicated layers
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,  # activated LoRA: on only after a token
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "astra_config": None,          # ASTRA (init_lora_weights="astra")
}
# Every field of PEFT's LoraConfig (peft 0.22.0). Another field in a file
# comes from a newer PEFT: off (None, False, empty) it is ignored, as a feature
# left off changes nothing; set, it is ignored with a warning, as PEFT does.
_KNOWN_FIELDS = frozenset({
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "astra_config",
    "auto_mapping",
    "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias",
    "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config",
    "target_modules", "target_parameters", "task_type",
    "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
})
# init_lora_weights values after which the file holds plain LoRA factors for
# the unmodified base model (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA change the
# base weights).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


# ----------------------------------------------------------------------------
# Name mapping.


def _lookup(name_map: NameMap, path: str) -> TorchPath | None:
  if callable(name_map) and not isinstance(name_map, Mapping):
    return name_map(path)
  return name_map.get(path)


def _torch_paths(value: TorchPath) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


def _is_conv_layout(layout: str) -> bool:
  """A conv kernel's layout in Haiku's HWIO: window and input channels in, then out."""
  return len(layout) > 2 and layout == IN * (len(layout) - 1) + OUT


def _kind(haiku_path: str, layout: str, linear: Sequence[str] = ()) -> str:
  """The torch side of a (per-layer) kernel: embedding, linear, conv or experts.

  A kernel with more than two axes whose last two are in, out is taken for
  an HWIO conv kernel unless ``linear`` names it.
  """
  if STACK in layout:
    return "experts"
  if haiku_path.rsplit("/", 1)[-1] == "embeddings" and len(layout) == 2:
    return "embedding"
  if (len(layout) > 2 and layout.endswith(IN + OUT)
      and not config_lib.matches_any(linear, haiku_path)):
    return "conv"
  return "linear"


# ----------------------------------------------------------------------------
# Factor layouts.


def _reverse_axes(x: np.ndarray) -> np.ndarray:
  """``[*lead, M, N]`` <-> ``[N, M, *lead]`` (Haiku HWIO <-> torch OIHW)."""
  nd = x.ndim
  return np.transpose(x, (nd - 1, nd - 2) + tuple(range(nd - 2)))


def _unreverse_axes(x: np.ndarray) -> np.ndarray:
  nd = x.ndim
  return np.transpose(x, tuple(range(2, nd)) + (1, 0))


def _sizes(w_shape, layout, role) -> tuple[int, ...]:
  return tuple(n for n, c in zip(w_shape, layout) if c == role)


def _to_peft(kind: str, haiku_path: str, w_shape, layout: str, a, b
             ) -> tuple[np.ndarray, np.ndarray]:
  """Haiku factors of one (per-layer) kernel -> PEFT's (A, B)."""
  a, b = np.asarray(a), np.asarray(b)  # gathered by the caller
  r = b.shape[-1]
  ins, outs = math.prod(_sizes(w_shape, layout, IN)), math.prod(_sizes(w_shape, layout, OUT))
  if kind == "embedding" and layout == OUT + IN:   # the table's rows are the out group
    return a, b
  if kind in ("linear", "embedding"):
    # nn.Linear(prod(in), prod(out)), the groups flattened in Haiku's axis order.
    return b.reshape(ins, r).T, a.reshape(r, outs).T
  if kind == "conv":
    if not _is_conv_layout(layout):
      raise ValueError(
          f"Cannot export '{haiku_path}' (kernel {tuple(w_shape)}, layout {layout!r}, "
          f"a {a.shape}, b {b.shape}) to PEFT: PEFT's conv LoRA needs b to span the "
          f"window with the input channels and a to be pointwise (layout "
          f"{IN * (len(w_shape) - 1) + OUT!r}). If the kernel is an nn.Linear, "
          "name it in linear=; if it is a stack of layers (hk.layer_stack), map it "
          "to a list of torch modules, one per layer.")
    return _reverse_axes(b), a.T.reshape(a.shape[1], r, *([1] * (len(w_shape) - 2)))
  # experts: PEFT's target_parameters keeps lora_A [E·r, in] (rows expert-major)
  # and lora_B [out, r·E] (columns expert-minor).
  if layout.count(STACK) != 1:
    raise ValueError(
        f"Cannot export '{haiku_path}' (kernel {tuple(w_shape)}, layout {layout!r}) to "
        "PEFT: PEFT's target_parameters adapts [experts, in, out] parameters, one "
        "stacked axis. Map a stack of layers to a list of torch modules instead.")
  n = b.shape[0]
  return (b.reshape(n, ins, r).transpose(0, 2, 1).reshape(n * r, ins),
          a.reshape(n, r, outs).transpose(2, 1, 0).reshape(outs, r * n))


def _from_peft(kind: str, w_shape, layout: str, A: np.ndarray, B: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray] | str:
  """PEFT's (A, B) of one (per-layer) kernel -> Haiku (a, b), or what is wrong."""
  w_shape = tuple(w_shape)
  in_shape, out_shape = _sizes(w_shape, layout, IN), _sizes(w_shape, layout, OUT)
  ins, outs = math.prod(in_shape), math.prod(out_shape)
  if kind == "experts":
    n = math.prod(_sizes(w_shape, layout, STACK))
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] % n:
      return f"expected 2-D factors with rows a multiple of {n} experts"
    r = A.shape[0] // n
    want_a, want_b = (n * r, ins), (outs, r * n)
  elif kind == "conv":
    nd = len(w_shape)
    if not _is_conv_layout(layout):
      return (f"a conv adapter needs the window with the input channels (layout "
              f"{IN * (nd - 1) + OUT!r}), not {layout!r}")
    if A.ndim != nd or B.ndim != nd:
      return f"expected {nd}-D conv factors for kernel {w_shape}"
    r = A.shape[0]
    want_a = (r, w_shape[-2]) + w_shape[:-2]
    want_b = (w_shape[-1], r) + (1,) * (nd - 2)
  else:
    if A.ndim != 2 or B.ndim != 2:
      return f"expected 2-D factors for kernel {w_shape}"
    r = A.shape[0]
    rows, cols = ((outs, ins) if kind == "embedding" and layout == OUT + IN
                  else (ins, outs))
    want_a, want_b = (r, rows), (cols, r)
  if A.shape != want_a or B.shape != want_b:
    return (f"expected A {want_a} and B {want_b} (r = {r}) for kernel {w_shape} "
            f"(layout {layout!r}); a grouped conv or a different base model?")
  if kind == "experts":
    stack = _sizes(w_shape, layout, STACK)
    b = A.reshape(n, r, ins).transpose(0, 2, 1).reshape(stack + in_shape + (r,))
    a = B.reshape(outs, r, n).transpose(2, 1, 0).reshape(stack + (r,) + out_shape)
    return a, b
  if kind == "conv":
    return B.reshape(w_shape[-1], r).T, _unreverse_axes(A)
  if kind == "embedding" and layout == OUT + IN:
    return A, B
  return B.T.reshape((r,) + out_shape), A.T.reshape(in_shape + (r,))


# ----------------------------------------------------------------------------
# PEFT's own matching rules (peft.tuners.tuners_utils.check_target_module_exists
# and peft.utils.other.get_pattern_key), restated without torch.


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


def _json_number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


# ----------------------------------------------------------------------------
# Export.


def _full_trained(flat: list[tuple[str, Any]], config) -> list[str]:
  out = []
  for path, value in flat:
    if dora.is_adapter(value):
      continue
    if config_lib.matches_any(config.full, path):
      out.append(path)
    elif (config.tune_vectors and np.ndim(value) < 2
          and jnp.issubdtype(value.dtype, jnp.inexact)):
      out.append(path)
  return out


def _most_common(values: list[Any]) -> Any:
  return max(sorted(set(values)), key=values.count)


def _write_dir(path: str, tensors: dict[str, np.ndarray], config: dict) -> None:
  """Writes both files; a new directory appears whole, an existing one file by file."""
  config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
  path = os.path.abspath(path)
  if not os.path.exists(path):
    with atomic.atomic_new_dir(path) as tmp:
      safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_NAME),
                                  metadata={"format": "pt"})
      with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        f.write(config_text)
    return
  if not os.path.isdir(path):
    raise ValueError(f"{path} exists and is not a directory.")
  # Weights first: the config is what marks the directory as an adapter.
  with atomic.atomic_path(os.path.join(path, WEIGHTS_NAME)) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
  with atomic.atomic_path(os.path.join(path, CONFIG_NAME)) as tmp:
    with open(tmp, "w") as f:
      f.write(config_text)


@deprecations.renamed_kwargs(spec="config")
def export_peft(path: str | os.PathLike,
                params: Any,
                config: ml_collections.ConfigDict | None,
                name_map: NameMap,
                *,
                base_model_name_or_path: str | None = None,
                linear: Sequence[str] = (),
                initial: Any = None) -> None:
  """Writes the LoRA adapters of ``params`` as a HuggingFace PEFT adapter.

  ``peft.PeftModel.from_pretrained(torch_model, path)`` then computes what
  the Haiku model computes with ``params``. The directory gets
  ``adapter_model.safetensors`` (factors in their own dtype) and
  ``adapter_config.json``; a new directory appears whole, files in an
  existing one are each replaced atomically. In a multi-process run every
  process calls it; process 0 writes, and each returns once it has.

  Examples:
    A Haiku transformer whose modules are named after a HuggingFace Llama
    (``LlamaForCausalLM``'s modules are ``model.layers.<i>.self_attn.q_proj``
    and so on)::

      LLAMA = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
               "value": "self_attn.v_proj", "out": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}

      def name_map(path):  # "transformer/layer_3/attn/query/w"
        if path == "embed/embeddings":
          return "model.embed_tokens"
        m = re.fullmatch(r"transformer/layer_(\\d+)/(?:attn|mlp)/(\\w+)/w", path)
        if m is None or m[2] not in LLAMA:
          return None
        return f"model.layers.{m[1]}.{LLAMA[m[2]]}"  # model.layers.3.self_attn.q_proj

    For ``hk.nets.MLP([64, 10], name="mlp")`` against
    ``nn.Sequential(nn.Linear(..), nn.ReLU(), nn.Linear(..))`` a dict does:
    ``{"mlp/~/linear_0/w": "0", "mlp/~/linear_1/w": "2"}``. A kernel stacked
    by ``hk.layer_stack`` maps to a list, one torch module per layer:
    ``{"layers/attn/query/w": [f"model.layers.{i}.self_attn.q_proj"
    for i in range(n)]}``.

    PEFT matches each ``target_modules`` entry also as a suffix: a torch
    module whose path ends in ``.<entry>`` gets an adapter too, which stays
    zero (PEFT's ``lora_B`` starts at zero and the file has nothing for it).

  Args:
    path: the adapter directory.
    params: adapted params (with LoraWeights, or DoraWeights: then
      ``use_dora`` is true and each module gets its magnitude).
    config: the config the model was built with; gives ``r``, ``lora_alpha`` and
      ``lora_dropout``, and parameters it trains in full are refused. None:
      the most common rank and alpha among the adapters, dropout 0.
    name_map: Haiku parameter path (``"module/param"``) -> torch module path,
      as a dict or a function returning None for unmapped paths. Only the
      LoraWeights' paths are looked up. Each LoraWeight's layout says what
      its torch module is: a parameter named ``embeddings`` is an
      ``nn.Embedding``; a kernel with a conv's layout (window and input
      channels in, output channels out: ``'iiio'``) an ``nn.ConvNd``; any
      other kernel the ``nn.Linear(prod(in), prod(out))`` it equals, its
      groups flattened in Haiku's axis order (an attention projection
      ``[d, heads, head_dim]`` is ``nn.Linear(d, heads·head_dim)``). A
      kernel with one stacked axis mapped to one path is an expert stack:
      the path names the torch ``nn.Parameter`` (``"<module>.<param>"``),
      adapted with PEFT's ``target_parameters``, whose parameter is
      ``[experts, in, out]`` (``[experts, out, in]`` without
      ``is_transposed`` on its module: the same factors).
    base_model_name_or_path: recorded in ``adapter_config.json``.
    linear: regexes of Haiku paths whose kernels map to ``nn.Linear`` though
      their layout is a conv's (a multi-axis output projection
      ``[heads, head_dim, d]`` has layout ``'iio'``, as a Conv1D has).
    initial: for adapters initialized with PiSSA (``config.init = "pissa"``):
      the params ``model.adapt`` returned, before training. Each adapter is
      then written as plain LoRA relative to the original base
      (``w_residual + s·b₀@a₀``), as PEFT's
      ``save_pretrained(path_initial_model_for_weight_conversion=...)``:
      rank ``2r`` factors ``[b | b₀]``, ``[a; -a₀]``, alpha doubled.

  Raises:
    ValueError: ``params`` hold no LoraWeight; a LoraWeight has no torch
      module (all are named) or shares one with another; the config trains
      parameters in full (PEFT's file would lack them); adapters disagree on
      rsLoRA or mix LoRA and DoRA (PEFT has one ``use_rslora`` and one
      ``use_dora``); a conv adapter is not in PEFT's
      layout; a stacked kernel's list has the wrong length; an expert stack
      has more than one stacked axis, or shares its torch module with
      another, or the config has LoRA dropout (PEFT's ``target_parameters``
      has none); the config says PiSSA but ``initial`` is missing (the file
      would not fit the original base), or ``initial`` is not these params'
      starting point.
  """
  flat, _ = paths.flatten_with_paths(params)
  loras = [(p, v) for p, v in flat if dora.is_adapter(v)]
  if not loras:
    raise ValueError("params hold no LoraWeight: nothing to export. Pass the "
                     "params returned by model.adapt (and trained).")
  if config is not None:
    full = _full_trained(flat, config)
    if full:
      raise ValueError(
          "A PEFT LoRA file holds only LoRA factors, but the config trains these "
          f"parameters in full (config.full / config.tune_vectors): {full}. "
          "Exporting would drop their training. If they were not trained, pass "
          "a config with full=() and tune_vectors=False.")
  use_dora = {isinstance(v, dora.DoraWeight) for _, v in loras}
  if len(use_dora) > 1:
    raise ValueError("PEFT has one use_dora for all modules; these adapters mix "
                     "LoRA and DoRA: " + str([(p, type(v).__name__) for p, v in loras])
                     + ". Export them as two adapters.")
  init = config.get("init", "default") if config is not None else "default"
  if init == "pissa" and initial is None:
    raise ValueError(
        "These adapters were initialized with PiSSA (config.init = 'pissa'): their "
        "base params are the residual, not the original base a PEFT user has. Pass "
        "initial=<the params model.adapt returned> to write plain LoRA relative to "
        "the original base (PEFT's path_initial_model_for_weight_conversion).")
  if initial is not None:
    by_path = dict(paths.flatten_with_paths(initial)[0])
    loras = [(p, pissa.plain_for_original(p, v, by_path)) for p, v in loras]
  rslora = {v.rslora for _, v in loras}
  if len(rslora) > 1:
    raise ValueError("PEFT has one use_rslora for all modules; these adapters "
                     f"mix: {[(p, v.rslora) for p, v in loras]}.")

  unmapped = [p for p, _ in loras if _lookup(name_map, p) is None]
  if unmapped:
    raise ValueError(f"name_map gives no torch module for these adapted parameters: "
                     f"{unmapped}.")
  tensors, ranks, alphas, owner, parameters = {}, {}, {}, {}, []
  for hpath, lora in loras:
    mapped = _lookup(name_map, hpath)
    targets = _torch_paths(mapped)
    shape, layout = tuple(lora.shape), lora_weight.layout_of(lora)
    # Arrays spanning other processes are gathered (multi-process runs).
    a_all, b_all = multihost.to_numpy(lora.a), multihost.to_numpy(lora.b)
    magnitude = getattr(lora, "magnitude", None)
    m_all = None if magnitude is None else multihost.to_numpy(magnitude)
    if isinstance(mapped, str):
      layers = [(targets[0], shape, layout, a_all, b_all, m_all)]
    else:
      if len(shape) < 3 or shape[0] != len(targets) or layout[0] != STACK:
        raise ValueError(
            f"name_map gives {len(targets)} torch modules for '{hpath}', a "
            f"kernel of shape {shape} (layout {layout!r}): a list needs one module "
            "per index of the leading stacked (layer) axis.")
      layers = [(t, shape[1:], layout[1:], a_all[i], b_all[i],
                 None if m_all is None else m_all[i])
                for i, t in enumerate(targets)]
    for tpath, w_shape, lay, a, b, m in layers:
      # Stacked axes of size 1 (a 1x1 conv's window in 0.1.0's form) are in axes.
      unit = "".join(IN if c == STACK and n == 1 else c for c, n in zip(lay, w_shape))
      if unit != lay:
        a_shape, b_shape = lora_weight.factor_shapes(tuple(w_shape), unit, lora.rank)
        lay, a, b = unit, np.reshape(a, a_shape), np.reshape(b, b_shape)
      kind = _kind(hpath, lay, linear)
      module = tpath.rpartition(".")[0] if kind == "experts" else tpath
      if module in owner:
        raise ValueError(
            f"name_map maps both '{owner[module]}' and '{hpath}' to torch module "
            f"'{module}'" + (" (PEFT nests the wrappers of several parameters of "
                             "one module in an order xrapture cannot see: export "
                             "one adapted parameter per torch module)."
                             if kind == "experts" else "."))
      owner[module] = hpath
      if kind == "experts":
        if not module:
          raise ValueError(f"'{hpath}' is an expert stack (layout {lay!r}), so "
                           "name_map must give the torch parameter's path, "
                           f"'<module>.<parameter>', not {tpath!r}.")
        parameters.append(tpath)
      A, B = _to_peft(kind, hpath, w_shape, lay, a, b)
      names = _EMBEDDING if kind == "embedding" else _LINEAR
      tensors[f"{_PREFIX}{module}.{names[0]}"] = np.ascontiguousarray(A)
      tensors[f"{_PREFIX}{module}.{names[1]}"] = np.ascontiguousarray(B)
      if m is not None:   # DoRA: PEFT's conv magnitude is [1, out, 1..], else [out]
        m = np.asarray(m)
        if kind == "conv":
          m = m.reshape((1, -1) + (1,) * (len(w_shape) - 2))
        else:
          m = m.reshape(-1)
        tensors[f"{_PREFIX}{module}.{_MAGNITUDE}"] = np.ascontiguousarray(m)
      ranks[tpath] = int(lora.rank)
      alphas[tpath] = float(lora.alpha)
  if parameters and config is not None and float(config.dropout) > 0.0:
    raise ValueError(
        f"PEFT's target_parameters (for the expert stacks {parameters}) does not "
        f"support lora_dropout, but config.dropout is {config.dropout}. Export with a "
        "config whose dropout is 0 (dropout does not change what the adapters compute).")

  if config is not None:
    r, alpha, dropout = int(config.rank), float(config.alpha), float(config.dropout)
    if initial is not None:   # PEFT's conversion doubles r and alpha
      r, alpha = 2 * r, alpha * (2 ** 0.5 if config.rslora else 2.0)
  else:
    r, alpha, dropout = _most_common(list(ranks.values())), _most_common(
        list(alphas.values())), 0.0
  config = {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "revision": None,
      "inference_mode": True,
      "r": r,
      "lora_alpha": _json_number(alpha),
      "lora_dropout": dropout,
      "use_rslora": rslora.pop(),
      "target_modules": sorted(set(ranks) - set(parameters)),
      "target_parameters": sorted(parameters) or None,
      "exclude_modules": None,
      "rank_pattern": _patterns(ranks, r),
      "alpha_pattern": {k: _json_number(v) for k, v in _patterns(alphas, alpha).items()},
      "fan_in_fan_out": False,
      "bias": "none",
      "lora_bias": False,
      "use_dora": use_dora.pop(),
      "modules_to_save": None,
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
      "layer_replication": None,
  }
  multihost.write_once(lambda: _write_dir(os.fspath(path), tensors, config),
                       os.fspath(path))


# ----------------------------------------------------------------------------
# Import.


def _read_files(path: str) -> tuple[str, dict[str, Any], str, dict[str, np.ndarray]]:
  """(config file, config, weights file, tensors) of a PEFT adapter directory."""
  config_file = os.path.join(path, CONFIG_NAME)
  weights_file = os.path.join(path, WEIGHTS_NAME)
  if (not os.path.exists(weights_file)
      and os.path.exists(os.path.join(path, _PICKLE_NAME))):
    raise ValueError(
        f"{path} holds {_PICKLE_NAME} (torch.save format) but no {WEIGHTS_NAME}: "
        f"only .safetensors adapters are supported. Convert it with torch: "
        f"safetensors.torch.save_file(torch.load('{_PICKLE_NAME}'), '{WEIGHTS_NAME}'), "
        "or save the PeftModel again with save_pretrained(dir, "
        "safe_serialization=True).")
  with open(config_file) as f:
    try:
      config = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"{config_file} is not valid JSON (truncated or corrupt?): "
                       f"{e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not a "
                     "PEFT config record.")
  unknown = sorted(k for k in set(config) - _KNOWN_FIELDS
                   if not _is_off(config[k]))
  if unknown:
    warnings.warn(
        f"{config_file} has fields xrapture does not know, written by a newer "
        f"PEFT?: {unknown}. They are ignored; if one changes what the adapter "
        "computes, the import will not reproduce the PEFT model.", UserWarning,
        stacklevel=3)
  try:
    tensors = safetensors.numpy.load_file(weights_file)
  except FileNotFoundError:
    raise
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{weights_file} is not a readable safetensors file "
                     f"(truncated or corrupt?): {e}") from e
  return config_file, config, weights_file, tensors


def _is_off(value: Any) -> bool:
  """Whether a config value leaves its feature off (None, False, empty)."""
  return value is None or value is False or (
      isinstance(value, (list, dict, str)) and not value)


def _check_config(config: Mapping[str, Any], where: str) -> None:
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only "
                     "'LORA' adapters can be imported.")
  problems = []
  for field, fine in _UNSUPPORTED.items():
    value = config.get(field, fine)
    if not (_is_off(value) or value == fine):
      problems.append(f"{field}={value!r}")
  init = config.get("init_lora_weights", True)
  if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
    problems.append(f"init_lora_weights={init!r} (the adapter belongs to a "
                    "modified base model; convert it to plain LoRA first)")
  if problems:
    raise ValueError(f"{where} uses PEFT features xrapture does not support: "
                     + "; ".join(problems) + ". Importing it would not reproduce "
                     "the PEFT model.")


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


# Haiku parameter name -> torch parameter name (hk.Linear, hk.Conv*, hk.Embed,
# hk.LayerNorm / hk.RMSNorm).
_TORCH_PARAM = {"w": "weight", "embeddings": "weight", "scale": "weight",
                "b": "bias", "offset": "bias"}


def _torch_to_haiku(hpath: str, value: np.ndarray, want, layout: str | None
                    ) -> np.ndarray:
  """A torch weight saved whole -> the Haiku kernel ``want``-shaped."""
  if hpath.rsplit("/", 1)[-1] != "w":
    return value
  if value.ndim != 2:
    return _unreverse_axes(value)
  if len(want) == 2 or layout is None:
    return value.T
  # nn.Linear(prod(in), prod(out)): unflatten the groups, then w's axis order.
  in_shape, out_shape = _sizes(want, layout, IN), _sizes(want, layout, OUT)
  order = [d for d, c in enumerate(layout) if c == IN] + [
      d for d, c in enumerate(layout) if c == OUT]
  if value.T.shape != (math.prod(in_shape), math.prod(out_shape)):
    return value.T
  return np.transpose(value.T.reshape(in_shape + out_shape), np.argsort(order))


def _layer_layout(layout: str | None, layer: int | None) -> str | None:
  """A kernel's layout for one torch module: less the stacked axis of a layer list."""
  if layout is None or layer is None:
    return layout
  return layout[1:] if layout[0] == STACK else None


def _default_layout(kind: str, w_shape) -> str | None:
  """The layout to read a file's factors in, for a plain base kernel."""
  nd = len(w_shape)
  if kind == "experts":
    return STACK + IN + OUT if nd == 3 else None
  if kind == "conv":
    return IN * (nd - 1) + OUT
  return IN + OUT if nd == 2 else None


def import_peft(path: str | os.PathLike, base_params: Any, name_map: NameMap,
                *, layouts: Mapping[str, str] | None = None) -> Any:
  """Reads a HuggingFace PEFT LoRA adapter onto Haiku ``base_params``.

  The result, run with :func:`xrapture.use_implicit_args` (or a
  :func:`xrapture.transform` model's ``apply``), computes what
  ``peft.PeftModel.from_pretrained(torch_model, path)`` computes when the
  torch model holds the same base weights. Each adapted module's rank comes
  from its tensors and its alpha from ``lora_alpha`` / ``alpha_pattern``,
  with ``use_rslora``; factors keep the file's dtype. Other tensors in the
  file (``modules_to_save``, biases saved with ``bias="all"`` or
  ``"lora_only"``, embedding weights PEFT saves alongside) replace the Haiku
  parameters they belong to, as PEFT loads them over the base model's: a
  torch ``<module>.weight`` / ``.bias`` is the Haiku parameter ``w``,
  ``embeddings`` or ``scale`` / ``b`` or ``offset`` that ``name_map`` maps
  to ``<module>``.

  Args:
    path: the adapter directory (``adapter_config.json`` and
      ``adapter_model.safetensors``).
    base_params: Haiku params of the base model: plain arrays, or adapted
      params (``model.adapt``), whose LoraWeights give each kernel's layout
      (their factors are replaced).
    name_map: as for :func:`export_peft`; every Haiku path of ``base_params``
      is looked up, so a function may return None for parameters that have
      no torch module. A path in the config's ``target_parameters`` (an
      expert stack's ``"<module>.<param>"``) reads PEFT's expert factors.
    layouts: Haiku path -> layout string for plain kernels with more than
      two axes that map to an ``nn.Linear`` (which of their axes are its
      input); not needed with adapted ``base_params``. Other plain kernels
      are read as ``[in, out]``, conv kernels as HWIO (``'iiio'``), expert
      stacks as ``[experts, in, out]``.

  Returns:
    ``base_params`` with every parameter that has an adapter in the file
    replaced by a LoraWeight (a DoraWeight when the config has
    ``use_dora``) and every parameter the file holds whole
    replaced by it; other leaves are the same objects.

  A config field that PEFT 0.21.2 does not have (from a newer PEFT) is
  ignored with a warning naming it.

  Raises:
    ValueError: a file is truncated or corrupt, or the directory holds only
      ``adapter_model.bin`` (the message names the file); the config uses a
      feature xrapture does not model (
      ``lora_bias``, layer replication, a PiSSA-like init, ...; all are
      named); the file lacks half a LoRA pair or has a tensor that name_map
      places on no Haiku parameter (all are named); a module in the file is
      not targeted by the config; factors or tensors do not fit their Haiku
      parameter (both shapes named); a stacked kernel lacks some layers or
      they disagree on rank or alpha.
  """
  config_file, config, weights_file, tensors = _read_files(os.fspath(path))
  _check_config(config, config_file)
  groups, others = _parse_keys(tensors, weights_file)

  r_default = config.get("r", 8)
  alpha_default = config.get("lora_alpha", 8)
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  rslora = bool(config.get("use_rslora", False))
  use_dora = bool(config.get("use_dora", False))
  dora_problems = sorted(f"{m}.{_MAGNITUDE}" for m, g in groups.items()
                         if ("M" in g) != use_dora)
  if dora_problems:
    raise ValueError(
        f"{config_file} has use_dora={use_dora}, but {weights_file} "
        f"{'lacks' if use_dora else 'has'} DoRA magnitudes: {dora_problems}.")

  flat, treedef = paths.flatten_with_paths(base_params)
  leaves = [v for _, v in flat]
  given_layouts = {}  # flat index -> layout, from LoraWeights or `layouts`
  for i, (hpath, value) in enumerate(flat):
    if isinstance(value, LoraWeight):
      given_layouts[i] = lora_weight.layout_of(value)
      flat[i] = (hpath, value.w)
    elif layouts and hpath in layouts:
      given_layouts[i] = layouts[hpath]
  expert_params = config.get("target_parameters") or ()
  kernels = {}  # torch module -> (flat index, layer index or None, expert stack?)
  params = {}   # "<torch module>.<torch param>" -> (flat index, layer index or None)
  for i, (hpath, value) in enumerate(flat):
    mapped = _lookup(name_map, hpath)
    if mapped is None:
      continue
    name = hpath.rsplit("/", 1)[-1]
    for layer, tpath in enumerate(_torch_paths(mapped)):
      at = (i, None if isinstance(mapped, str) else layer)
      experts = isinstance(mapped, str) and any(
          tpath == t or tpath.endswith("." + t) or t.endswith("." + tpath)
          for t in expert_params)
      if name in _TORCH_PARAM and not experts:
        key = f"{tpath}.{_TORCH_PARAM[name]}"
        if key in params:
          raise ValueError(f"name_map maps both '{flat[params[key][0]][0]}' and "
                           f"'{hpath}' to torch parameter '{key}'.")
        params[key] = at
      if np.ndim(value) >= 2 and name != "b":
        module = tpath.rpartition(".")[0] if experts else tpath
        if module in kernels:
          raise ValueError(f"name_map maps both '{flat[kernels[module][0]][0]}' and "
                           f"'{hpath}' to torch module '{module}'.")
        kernels[module] = at + (tpath if experts else None,)

  unplaced = sorted(m for m in groups if m not in kernels)
  if unplaced:
    raise ValueError(f"{weights_file} has adapters for torch modules that name_map "
                     f"gives no Haiku kernel: {unplaced}.")
  untargeted = sorted(m for m in groups
                      if kernels[m][2] is None and not _peft_targets(config, m))
  if untargeted:
    raise ValueError(
        f"{weights_file} has adapters for modules that {config_file}'s "
        f"target_modules {config.get('target_modules')!r} do not target (PEFT "
        f"would ignore them): {untargeted}.")

  def adapted(module):
    if config.get("target_modules") == "all-linear":
      return module in groups
    return _peft_targets(config, module)

  whole: dict[int, dict[int | None, np.ndarray]] = {}
  unknown = []
  saved_whole = config.get("modules_to_save") or ()
  for rest, value in others.items():
    module, _, param = rest.rpartition(".")
    owner, _, inner = module.rpartition(".")
    if inner in ("modules_to_save", "original_module") and any(
        re.fullmatch(rf"(.*\.)?{m}", owner) for m in saved_whole):
      # bias="all" also saves a ModulesToSaveWrapper's internals: PEFT loads
      # them nowhere or into the copy the forward pass does not use.
      continue
    lora_layer = module.endswith(".base_layer")
    if lora_layer:
      module = module[:-len(".base_layer")]
    # PEFT loads `<m>.base_layer.<p>` into adapted modules and `<m>.<p>` into
    # the others; a key of the wrong form is one PEFT ignores.
    if (f"{module}.{param}" not in params
        or lora_layer != adapted(module)):
      unknown.append(_PREFIX + rest)
      continue
    i, layer = params[f"{module}.{param}"]
    hpath, base = flat[i]
    if config.get("fan_in_fan_out") and hpath.endswith("/w"):
      raise ValueError(f"{config_file} has fan_in_fan_out=true: the layout of "
                       f"'{_PREFIX}{rest}' ([in, out] or [out, in]) is unknown.")
    want = tuple(np.shape(base))[0 if layer is None else 1:]
    value = _torch_to_haiku(hpath, value, want, _layer_layout(given_layouts.get(i), layer))
    if value.shape != want:
      raise ValueError(f"'{_PREFIX}{rest}' has shape {value.shape} in Haiku's layout "
                       f"but Haiku '{hpath}' needs {want}.")
    whole.setdefault(i, {})[layer] = value
  if unknown:
    raise ValueError(
        f"{weights_file} holds tensors that name_map places on no Haiku parameter "
        f"(or that PEFT would not load): {sorted(unknown)}. Map the Haiku "
        "parameters of those torch modules (w/embeddings/scale -> weight, "
        "b/offset -> bias) in name_map.")
  for i, layers in whole.items():
    hpath, base = flat[i]
    if None in layers:
      new = layers[None]
    else:
      missing = [k for k in range(np.shape(base)[0]) if k not in layers]
      if missing:
        raise ValueError(f"{weights_file} replaces only some layers of stacked "
                         f"'{hpath}' (not {missing}).")
      new = np.stack([layers[k] for k in range(len(layers))])
    leaves[i] = jnp.asarray(new, dtype=base.dtype)

  per_leaf: dict[int, dict[int | None, tuple]] = {}
  layouts_found: dict[int, str] = {}
  for module, group in groups.items():
    i, layer, param_path = kernels[module]
    tpath = param_path or module
    hpath, w = flat[i]
    w_shape = tuple(np.shape(w))
    if layer is not None:
      w_shape = w_shape[1:]
    kind = group["kind"]
    if param_path is not None:
      kind = "experts"
    elif kind == "linear" and group["A"].ndim > 2:
      kind = "conv"
    if kind == "embedding" and len(w_shape) != 2:
      raise ValueError(f"'{tpath}' is an embedding adapter but '{hpath}' has shape "
                       f"{tuple(np.shape(w))}.")
    lay = _layer_layout(given_layouts.get(i), layer)
    if lay is None:
      lay = _default_layout(kind, w_shape)
    if lay is None:
      raise ValueError(
          f"'{tpath}' is an nn.Linear adapter for Haiku '{hpath}' of shape "
          f"{tuple(np.shape(w))}: which of its axes are the Linear's input is "
          "read from how apply uses the kernel. Pass adapted params "
          "(model.adapt(rng, base, *inputs)) as base_params, or "
          f"layouts={{'{hpath}': ...}} (e.g. 'ioo' for [in, heads, head_dim]).")
    layouts_found[i] = lay if layer is None else STACK + lay
    factors = _from_peft(kind, w_shape, lay, group["A"], group["B"])
    if isinstance(factors, str):
      raise ValueError(
          f"Shapes of '{tpath}' (lora_A {group['A'].shape}, lora_B "
          f"{group['B'].shape}) do not fit Haiku '{hpath}' of shape "
          f"{tuple(np.shape(w))}: {factors}.")
    rank = factors[1].shape[-1]
    r_config = _pattern_value(rank_pattern, tpath, r_default)
    if rank != r_config:
      raise ValueError(
          f"'{tpath}' has rank {rank} in the file but {r_config} in "
          f"{config_file} (r / rank_pattern); PEFT could not load it.")
    alpha = float(_pattern_value(alpha_pattern, tpath, alpha_default))
    magnitude = None
    if use_dora:
      magnitude = np.asarray(group["M"])
      out_features = w_shape[-1]
      if magnitude.size != out_features or magnitude.shape[0] not in (1, out_features):
        raise ValueError(f"'{tpath}.{_MAGNITUDE}' has shape {magnitude.shape}; Haiku "
                         f"'{hpath}' has {out_features} output features.")
      magnitude = magnitude.reshape(out_features)
    per_leaf.setdefault(i, {})[layer] = factors + (rank, alpha, magnitude)

  for i, layers in per_leaf.items():
    hpath, _ = flat[i]
    w = leaves[i].w if isinstance(leaves[i], LoraWeight) else leaves[i]
    if None in layers:
      a, b, _, alpha, magnitude = layers[None]
    else:
      n = np.shape(w)[0]
      missing = [k for k in range(n) if k not in layers]
      if missing:
        names = _torch_paths(_lookup(name_map, hpath))
        raise ValueError(
            f"'{hpath}' is a stack of {n} layers but {weights_file} has no adapter "
            f"for layers {missing} ({[names[k] for k in missing]}); xrapture "
            "adapts a stacked kernel in every layer or none.")
      distinct = {(layers[k][2], layers[k][3]) for k in range(n)}
      if len(distinct) > 1:
        raise ValueError(f"The layers of stacked '{hpath}' have different (rank, "
                         f"alpha) in the file: {sorted(distinct)}; one LoraWeight "
                         "has one rank and alpha.")
      a = np.stack([layers[k][0] for k in range(n)])
      b = np.stack([layers[k][1] for k in range(n)])
      alpha = layers[0][3]
      magnitude = None if not use_dora else np.stack([layers[k][4] for k in range(n)])
    leaves[i] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), alpha=alpha,
                           rslora=rslora, layout=layouts_found[i])
    if use_dora:
      leaves[i] = dora.from_lora(leaves[i], jnp.asarray(magnitude))
  return jax.tree_util.tree_unflatten(treedef, leaves)
