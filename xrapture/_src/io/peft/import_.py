"""``import_peft``: a HuggingFace PEFT adapter directory -> Haiku LoRA/DoRA adapters."""

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.io.peft import adapter_config
from xrapture._src.io.peft import convert
from xrapture._src.io.peft import files
from xrapture._src.io.peft import keys
from xrapture._src.io.peft import naming
from xrapture._src.io.peft import patterns
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import paths

LoraWeight = lora_weight.LoraWeight
STACK = lora_weight.STACK


def import_peft(path: str | os.PathLike, base_params: Any, name_map: naming.NameMap,
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
  config_file, config, weights_file, tensors = files._read_files(os.fspath(path))
  adapter_config._check_config(config, config_file)
  groups, others = keys._parse_keys(tensors, weights_file)

  r_default = config.get("r", 8)
  alpha_default = config.get("lora_alpha", 8)
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  rslora = bool(config.get("use_rslora", False))
  use_dora = bool(config.get("use_dora", False))
  dora_problems = sorted(f"{m}.{keys._MAGNITUDE}" for m, g in groups.items()
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
    mapped = naming._lookup(name_map, hpath)
    if mapped is None:
      continue
    name = hpath.rsplit("/", 1)[-1]
    for layer, tpath in enumerate(naming._torch_paths(mapped)):
      at = (i, None if isinstance(mapped, str) else layer)
      experts = isinstance(mapped, str) and any(
          tpath == t or tpath.endswith("." + t) or t.endswith("." + tpath)
          for t in expert_params)
      if name in naming._TORCH_PARAM and not experts:
        key = f"{tpath}.{naming._TORCH_PARAM[name]}"
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
                      if kernels[m][2] is None and not patterns._peft_targets(config, m))
  if untargeted:
    raise ValueError(
        f"{weights_file} has adapters for modules that {config_file}'s "
        f"target_modules {config.get('target_modules')!r} do not target (PEFT "
        f"would ignore them): {untargeted}.")

  def adapted(module):
    if config.get("target_modules") == "all-linear":
      return module in groups
    return patterns._peft_targets(config, module)

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
      unknown.append(keys._PREFIX + rest)
      continue
    i, layer = params[f"{module}.{param}"]
    hpath, base = flat[i]
    if config.get("fan_in_fan_out") and hpath.endswith("/w"):
      raise ValueError(f"{config_file} has fan_in_fan_out=true: the layout of "
                       f"'{keys._PREFIX}{rest}' ([in, out] or [out, in]) is unknown.")
    want = tuple(np.shape(base))[0 if layer is None else 1:]
    value = convert._torch_to_haiku(
        hpath, value, want, convert._layer_layout(given_layouts.get(i), layer))
    if value.shape != want:
      raise ValueError(f"'{keys._PREFIX}{rest}' has shape {value.shape} in Haiku's layout "
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
    lay = convert._layer_layout(given_layouts.get(i), layer)
    if lay is None:
      lay = convert._default_layout(kind, w_shape)
    if lay is None:
      raise ValueError(
          f"'{tpath}' is an nn.Linear adapter for Haiku '{hpath}' of shape "
          f"{tuple(np.shape(w))}: which of its axes are the Linear's input is "
          "read from how apply uses the kernel. Pass adapted params "
          "(model.adapt(rng, base, *inputs)) as base_params, or "
          f"layouts={{'{hpath}': ...}} (e.g. 'ioo' for [in, heads, head_dim]).")
    layouts_found[i] = lay if layer is None else STACK + lay
    factors = convert._from_peft(kind, w_shape, lay, group["A"], group["B"])
    if isinstance(factors, str):
      raise ValueError(
          f"Shapes of '{tpath}' (lora_A {group['A'].shape}, lora_B "
          f"{group['B'].shape}) do not fit Haiku '{hpath}' of shape "
          f"{tuple(np.shape(w))}: {factors}.")
    rank = factors[1].shape[-1]
    r_config = patterns._pattern_value(rank_pattern, tpath, r_default)
    if rank != r_config:
      raise ValueError(
          f"'{tpath}' has rank {rank} in the file but {r_config} in "
          f"{config_file} (r / rank_pattern); PEFT could not load it.")
    alpha = float(patterns._pattern_value(alpha_pattern, tpath, alpha_default))
    magnitude = None
    if use_dora:
      magnitude = np.asarray(group["M"])
      out_features = w_shape[-1]
      if magnitude.size != out_features or magnitude.shape[0] not in (1, out_features):
        raise ValueError(f"'{tpath}.{keys._MAGNITUDE}' has shape {magnitude.shape}; Haiku "
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
        names = naming._torch_paths(naming._lookup(name_map, hpath))
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
