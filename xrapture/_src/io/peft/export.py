"""``export_peft``: Haiku LoRA/DoRA adapters -> a HuggingFace PEFT adapter directory."""

import os
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from xrapture._src import deprecations
from xrapture._src.io import multihost
from xrapture._src.io.peft import convert
from xrapture._src.io.peft import files
from xrapture._src.io.peft import keys
from xrapture._src.io.peft import naming
from xrapture._src.io.peft import patterns
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import config as config_lib
from xrapture._src.transform import paths
from xrapture._src.transform import pissa

STACK, IN = lora_weight.STACK, lora_weight.IN


def _json_number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


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


@deprecations.renamed_kwargs(spec="config")
def export_peft(path: str | os.PathLike,
                params: Any,
                config: ml_collections.ConfigDict | None,
                name_map: naming.NameMap,
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

  unmapped = [p for p, _ in loras if naming._lookup(name_map, p) is None]
  if unmapped:
    raise ValueError(f"name_map gives no torch module for these adapted parameters: "
                     f"{unmapped}.")
  tensors, ranks, alphas, owner, parameters = {}, {}, {}, {}, []
  for hpath, lora in loras:
    mapped = naming._lookup(name_map, hpath)
    targets = naming._torch_paths(mapped)
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
      kind = convert._kind(hpath, lay, linear)
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
      A, B = convert._to_peft(kind, hpath, w_shape, lay, a, b)
      names = keys._EMBEDDING if kind == "embedding" else keys._LINEAR
      tensors[f"{keys._PREFIX}{module}.{names[0]}"] = np.ascontiguousarray(A)
      tensors[f"{keys._PREFIX}{module}.{names[1]}"] = np.ascontiguousarray(B)
      if m is not None:   # DoRA: PEFT's conv magnitude is [1, out, 1..], else [out]
        m = np.asarray(m)
        if kind == "conv":
          m = m.reshape((1, -1) + (1,) * (len(w_shape) - 2))
        else:
          m = m.reshape(-1)
        tensors[f"{keys._PREFIX}{module}.{keys._MAGNITUDE}"] = np.ascontiguousarray(m)
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
      "rank_pattern": patterns._patterns(ranks, r),
      "alpha_pattern": {k: _json_number(v) for k, v in patterns._patterns(alphas, alpha).items()},
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
  multihost.write_once(lambda: files._write_dir(os.fspath(path), tensors, config),
                       os.fspath(path))
