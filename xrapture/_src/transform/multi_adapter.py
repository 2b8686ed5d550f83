"""Several adapters over one frozen base: add, switch, disable, delete, combine, unmerge.

An :class:`AdapterSet` holds base params and named adapters; every function
here returns a new set (nothing is changed in place), and
:func:`adapter_params` gives the params tree a model's ``apply`` runs: the
base with the active adapter's LoraWeights (or the base alone). The example
is in :class:`AdapterSet`'s docstring (shown in the API docs).
"""

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.transform import paths
from xrapture._src.transform import pissa

LoraWeight = lora_weight.LoraWeight
EmptyNode = implicit_array.EmptyNode
BASE = "__base__"
COMBINATIONS = ("linear", "cat", "svd")


@dataclasses.dataclass(frozen=True)
class AdapterSet:
  """Base params plus named adapters; at most one active.

  Every function on a set returns a new one; :func:`xrapture.adapter_params`
  gives the params tree a model's ``apply`` runs.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> config = xrapture.default_config(); config.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(3)(x), config)
    >>> x = jnp.ones((1, 4))
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> french = model.adapt(jax.random.PRNGKey(1), base)   # ... trained
    >>> german = model.adapt(jax.random.PRNGKey(2), base)   # ... trained
    >>> adapters = xrapture.AdapterSet(base)
    >>> adapters = xrapture.add_adapter(adapters, "fr", french)
    >>> adapters = xrapture.add_adapter(adapters, "de", german)
    >>> adapters = xrapture.set_adapter(adapters, "de")
    >>> y = model.apply(xrapture.adapter_params(adapters), None, x)
    >>> adapters = xrapture.add_weighted_adapter(
    ...     adapters, ["fr", "de"], [0.5, 0.5], "mix", combination_type="cat")
    >>> adapters.names
    ('fr', 'de', 'mix')
    >>> base_only = xrapture.adapter_params(xrapture.disable_adapters(adapters))

  Attributes:
    base: the frozen base params (plain arrays).
    adapters: name -> a tree like ``base`` holding, per adapted kernel, its
      LoraWeight/DoraWeight with ``w`` replaced by ``EmptyNode`` (the
      factors only), per parameter the adapter trains in full its array,
      and ``EmptyNode`` elsewhere.
    active: the active adapter's name, or None (the base alone).
  """
  base: Any
  adapters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  active: str | None = None

  @property
  def names(self) -> tuple[str, ...]:
    """The adapters' names, in the order they were added."""
    return tuple(self.adapters)


jax.tree_util.register_dataclass(
    AdapterSet, data_fields=["base", "adapters"], meta_fields=["active"])


def _unknown(adapters: AdapterSet, name: Any) -> ValueError:
  return ValueError(f"No adapter named {name!r}; this AdapterSet has "
                    f"{list(adapters.names) or 'no adapters'}.")


def _check_name(adapters: AdapterSet, name: Any) -> None:
  if name not in adapters.adapters:
    raise _unknown(adapters, name)


def _without_w(x: Any) -> Any:
  return implicit_array.map_fields(lambda f, v: EmptyNode if f == "w" else v, x)


def _flat(tree: Any) -> list[Any]:
  return jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: implicit_array.is_implicit(x) or x is EmptyNode)


def add_adapter(adapters: AdapterSet, name: str, params: Any,
                lora_spec: Any = None, initial: Any = None) -> AdapterSet:
  """A new set with ``params``' adapters added under ``name`` (not activated).

  Args:
    adapters: the set.
    name: a new name (not ``"__base__"``, which means the base in mixed
      batches).
    params: adapted params over the same base (``model.adapt`` output,
      trained, or ``load_adapter`` / ``import_peft`` output).
    lora_spec: ``model.lora_spec(base)``; with it the parameters it trains in
      full (``LORA_FULL``) belong to the adapter too.
    initial: for adapters initialized with PiSSA (``config.init =
      "pissa"``): the params ``model.adapt`` returned, before training. Their
      kernels hold the residual of the set's base, so they are added as plain
      LoRA for the set's base (rank ``2r``, as ``save_adapter(...,
      initial=)`` writes them). Not needed when the set's base is that
      residual.

  Raises:
    ValueError: the name is taken or reserved; ``params`` do not have the
      base's structure, or an adapted kernel's base shape differs from the
      base's (the path and both shapes are named); a PiSSA adapter over
      another base than the set's, without ``initial``.
  """
  if not isinstance(name, str) or not name or name == BASE:
    raise ValueError(f"Adapter names are non-empty strings other than {BASE!r}; "
                     f"got {name!r}.")
  if name in adapters.adapters:
    raise ValueError(f"An adapter named {name!r} exists already "
                     f"({list(adapters.names)}); delete it first or pick another name.")
  base_flat, base_def = paths.flatten_with_paths(adapters.base)
  flat, treedef = paths.flatten_with_paths(params)
  if treedef != base_def:
    raise ValueError(
        f"Adapter {name!r} does not fit the base: its parameters are "
        f"{[p for p, _ in flat]}, the base's {[p for p, _ in base_flat]}.")
  ranks = (jax.tree_util.tree_leaves(lora_spec) if lora_spec is not None
           else [lora_weight.LORA_FREEZE] * len(flat))
  starts = None if initial is None else dict(paths.flatten_with_paths(initial)[0])
  out = []
  for (path, value), (_, base), rank in zip(flat, base_flat, ranks):
    if dora.is_adapter(value):
      if tuple(value.shape) != tuple(np.shape(base)):
        raise ValueError(f"Adapter {name!r}: '{path}' adapts a kernel of shape "
                         f"{tuple(value.shape)}, the base's is {tuple(np.shape(base))}.")
      if getattr(value, "residual", False) and not pissa.same_kernel(value.w, base):
        # Over the set's base, its factors would add the top-r singular
        # directions a second time.
        if starts is None:
          raise ValueError(
              f"Adapter {name!r}: '{path}' is a PiSSA adapter (its kernel is "
              "the residual of another base than this set's). Pass "
              "initial=<the params model.adapt returned, before training> to "
              "add it as plain LoRA for this base.")
        value = pissa.plain_for_original(path, value, starts)
      out.append(_without_w(value))
    elif rank == lora_weight.LORA_FULL:
      out.append(value)
    else:
      out.append(EmptyNode)
  tree = jax.tree_util.tree_unflatten(base_def, out)
  return dataclasses.replace(adapters, adapters={**adapters.adapters, name: tree})


def set_adapter(adapters: AdapterSet, name: str) -> AdapterSet:
  """A new set whose active adapter is ``name``.

  Raises:
    ValueError: no adapter has that name (the message lists those there are).
  """
  _check_name(adapters, name)
  return dataclasses.replace(adapters, active=name)


def disable_adapters(adapters: AdapterSet) -> AdapterSet:
  """A new set with no active adapter: :func:`adapter_params` gives the base."""
  return dataclasses.replace(adapters, active=None)


def delete_adapter(adapters: AdapterSet, name: str) -> AdapterSet:
  """A new set without ``name`` (no adapter is active if it was).

  Raises:
    ValueError: no adapter has that name (the message lists those there are).
  """
  _check_name(adapters, name)
  rest = {k: v for k, v in adapters.adapters.items() if k != name}
  return dataclasses.replace(adapters, adapters=rest,
                             active=None if adapters.active == name else adapters.active)


def _attach(base: Any, factors: Any) -> Any:
  """``factors`` (an adapter without ``w``) around ``base``; a full leaf as it is."""
  if factors is EmptyNode:
    return base
  if dora.is_adapter(factors):
    return factors.replace(w=base)
  return factors


def adapter_params(adapters: AdapterSet, name: str | None = "active") -> Any:
  """The params tree to run: the base with one adapter, or the base alone.

  Args:
    adapters: the set.
    name: an adapter's name; ``"active"`` (default) for the active one; None
      or ``"__base__"`` for the base alone.

  Returns:
    ``base`` with the adapter's kernels as LoraWeights/DoraWeights and its
    fully trained parameters in place; other leaves are the base's objects.
  """
  name = adapters.active if name == "active" else name
  if name is None or name == BASE:
    return adapters.base
  _check_name(adapters, name)
  base_flat, treedef = jax.tree_util.tree_flatten(adapters.base)
  return jax.tree_util.tree_unflatten(
      treedef, [_attach(b, f) for b, f in zip(base_flat, _flat(adapters.adapters[name]))])


def merge_adapter(adapters: AdapterSet, name: str | None = "active") -> Any:
  """The base with adapter ``name`` merged in: plain arrays ``w + s·b@a``.

  A DoRA adapter merges as PEFT does (``m / ‖w + s·b@a‖_c · (w + s·b@a)``).
  """
  from xrapture._src.transform import adapters as adapters_lib  # pylint: disable=g-import-not-at-top
  return adapters_lib.merge_params(adapter_params(adapters, name))


def unmerge_adapter(merged: Any, adapters: AdapterSet, name: str) -> Any:
  """``merged`` less adapter ``name``'s update: each kernel ``w' - s·b@a``.

  The inverse of :func:`merge_adapter` for a LoRA adapter (to floating-point
  rounding of ``w + Δ - Δ``), whatever base it was merged into.

  Raises:
    ValueError: no adapter has that name; it is a DoRA adapter (its merge
      rescales the columns by norms of the unmerged kernel, which the
      merged kernel does not determine: keep the base instead); ``merged``
      does not have the base's structure; the adapter trains parameters in
      full (their base values are not in the merged params).
  """
  _check_name(adapters, name)
  leaves, treedef = jax.tree_util.tree_flatten(merged)
  _, base_def = jax.tree_util.tree_flatten(adapters.base)
  if treedef != base_def:  # type: ignore[operator]  # jaxlib 0.10 has no PyTreeDef stub
    raise ValueError("unmerge_adapter: `merged` does not have the base's structure "
                     "(pass the output of merge_adapter or merge_params).")
  out = []
  for path_value, factors in zip(paths.flatten_with_paths(merged)[0],
                                 _flat(adapters.adapters[name])):
    path, value = path_value
    if factors is EmptyNode:
      out.append(value)
    elif isinstance(factors, dora.DoraWeight):
      raise ValueError(
          f"Adapter {name!r} is a DoRA adapter ('{path}'): a merged DoRA kernel "
          "has columns of norm `magnitude` whatever the base, so the base cannot "
          "be recovered from it. Keep the base params (AdapterSet.base) instead.")
    elif isinstance(factors, LoraWeight):
      delta = factors.replace(w=jnp.zeros_like(value)).delta()
      out.append((value - delta.astype(value.dtype)).astype(value.dtype))
    else:
      raise ValueError(
          f"Adapter {name!r} trains '{path}' in full: its base value is not in the "
          "merged params. Use AdapterSet.base instead of unmerging.")
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Weighted combination (PEFT's add_weighted_adapter).


def _grouped(lora: LoraWeight) -> tuple[jax.Array, jax.Array]:
  """``b [*S, M, r]``, ``a [*S, r, N]``: the factors of the grouped matrix."""
  stack, _, _ = lora.groups
  s_shape = tuple(lora.shape[d] for d in stack)
  m, n = lora.grouped_shape
  return (lora.b.reshape(s_shape + (m, lora.rank)),
          lora.a.reshape(s_shape + (lora.rank, n)))


def _ungrouped(like: LoraWeight, b: jax.Array, a: jax.Array) -> LoraWeight:
  """A LoraWeight on ``like``'s kernel from grouped ``b``, ``a`` with scale 1."""
  layout = lora_weight.layout_of(like)
  r = b.shape[-1]
  a_shape, b_shape = lora_weight.factor_shapes(tuple(like.shape), layout, r)
  return LoraWeight(like.w, a.reshape(a_shape), b.reshape(b_shape), alpha=float(r),
                    rslora=False, layout=layout)


def _combine(method, parts, svd_rank, svd_clamp, path):
  """One kernel's new LoraWeight (scale 1) from ``[(weight, lora)]``."""
  first = parts[0][1]
  dtype = jnp.result_type(*[l.a for _, l in parts], *[l.b for _, l in parts])
  if method == "cat":
    bs = [_grouped(l)[0] * (w * l.get_scale()) for w, l in parts]
    as_ = [_grouped(l)[1] for _, l in parts]
    return _ungrouped(first, jnp.concatenate(bs, -1).astype(dtype),
                      jnp.concatenate(as_, -2).astype(dtype))
  if method == "linear":
    ranks = sorted({l.rank for _, l in parts})
    if len(ranks) > 1:
      raise ValueError(
          f"combination_type='linear' needs equal ranks, but '{path}' has ranks "
          f"{[l.rank for _, l in parts]}. Use 'cat' or 'svd'.")
    b = sum(math.copysign(math.sqrt(abs(w * l.get_scale())), w * l.get_scale())
            * _grouped(l)[0] for w, l in parts)
    a = sum(math.sqrt(abs(w * l.get_scale())) * _grouped(l)[1] for w, l in parts)
    # jnp.asarray: to mypy, sum() may be the int 0 (never: parts is not empty).
    return _ungrouped(first, jnp.asarray(b, dtype), jnp.asarray(a, dtype))
  # svd: the best rank-k approximation of the weighted sum of the updates.
  delta = sum(w * l.get_scale() * jnp.matmul(*_grouped(l)) for w, l in parts)
  delta = delta.astype(jnp.promote_types(dtype, jnp.float32))
  k = svd_rank or max(l.rank for _, l in parts)
  if k > min(delta.shape[-2:]):
    raise ValueError(f"svd_rank {k} exceeds min(M, N) = {min(delta.shape[-2:])} "
                     f"of '{path}' (grouped matrix {delta.shape[-2:]}).")
  u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
  b, a = u[..., :k], s[..., :k, None] * vh[..., :k, :]
  if svd_clamp is not None:
    lead = b.shape[:-2]
    dist = jnp.concatenate([b.reshape(lead + (-1,)), a.reshape(lead + (-1,))], -1)
    hi = jnp.quantile(dist, svd_clamp, axis=-1)[..., None, None]
    b, a = jnp.clip(b, -hi, hi), jnp.clip(a, -hi, hi)
  return _ungrouped(first, b.astype(dtype), a.astype(dtype))


def add_weighted_adapter(adapters: AdapterSet, names: Sequence[str],
                         weights: Sequence[float], new_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None) -> AdapterSet:
  """A new set with a weighted combination of adapters added as ``new_name``.

  As PEFT's ``add_weighted_adapter``; the new adapter has scale 1
  (``alpha = rank``) and each adapter's weight multiplies its scaled update
  ``s_i·b_i@a_i``:

  * ``"cat"``: exact, ``Σ w_i s_i b_i@a_i`` with the ranks concatenated
    (rank ``Σ r_i``);
  * ``"linear"``: ``(Σ ±√|w_i s_i| b_i) @ (Σ √|w_i s_i| a_i)`` (the sign
    on ``b``), equal ranks only: cheap, but not the weighted sum of the
    updates when there are several;
  * ``"svd"``: the best rank-``svd_rank`` (default: the largest rank)
    approximation of ``Σ w_i s_i b_i@a_i``, per kernel (per stacked element,
    on the grouped matrix); ``svd_clamp`` clamps the factors' entries to
    that quantile of their magnitudes, as PEFT does.

  A kernel that only some of the adapters adapt combines those; with a
  single adapter the combination is ``"linear"`` (as PEFT).

  Raises:
    ValueError: an unknown name (the message lists those there are), a
      taken ``new_name``, an unknown ``combination_type``, weights and names
      of different lengths, ``"linear"`` with different ranks or targets,
      DoRA adapters (their magnitudes do not combine), adapters that train
      parameters in full, or kernels with different layouts.
  """
  names, weights = list(names), [float(w) for w in weights]
  if combination_type not in COMBINATIONS:
    raise ValueError(f"combination_type must be one of {COMBINATIONS}, "
                     f"got {combination_type!r}.")
  if not names or len(names) != len(weights):
    raise ValueError(f"Pass one weight per adapter: {len(names)} names, "
                     f"{len(weights)} weights.")
  for name in names:
    _check_name(adapters, name)
  method = "linear" if len(names) == 1 else combination_type
  base_flat, treedef = paths.flatten_with_paths(adapters.base)
  per_adapter = [_flat(adapters.adapters[n]) for n in names]
  if method == "linear":
    targets = {n: {p for (p, _), f in zip(base_flat, fs) if f is not EmptyNode}
               for n, fs in zip(names, per_adapter)}
    if len({frozenset(t) for t in targets.values()}) > 1:
      everywhere = set.intersection(*targets.values())
      raise ValueError(
          "combination_type='linear' needs adapters of the same targets; these "
          "differ: " + "; ".join(f"{n} also adapts {sorted(t - everywhere)}"
                                 for n, t in targets.items() if t - everywhere)
          + ". Use 'cat' or 'svd'.")
  out = []
  for i, (path, base) in enumerate(base_flat):
    parts = []
    for name, weight, factors in zip(names, weights, per_adapter):
      f = factors[i]
      if f is EmptyNode:
        continue
      if isinstance(f, dora.DoraWeight):
        raise ValueError(f"Adapter {name!r} is a DoRA adapter ('{path}'); DoRA "
                         "magnitudes do not combine. Combine LoRA adapters only.")
      if not isinstance(f, LoraWeight):
        raise ValueError(f"Adapter {name!r} trains '{path}' in full; only LoRA "
                         "factors combine. Add it without lora_spec to drop those.")
      parts.append((weight, f.replace(w=base)))
    if not parts:
      out.append(EmptyNode)
      continue
    layouts = {lora_weight.layout_of(l) for _, l in parts}
    if len(layouts) > 1:
      raise ValueError(f"The adapters of '{path}' have different layouts {sorted(layouts)}.")
    out.append(_without_w(_combine(method, parts, svd_rank, svd_clamp, path)))
  combined = jax.tree_util.tree_unflatten(treedef, out)
  if new_name in adapters.adapters or new_name == BASE or not new_name:
    raise ValueError(f"Cannot name the combination {new_name!r}: taken or reserved "
                     f"({list(adapters.names)}).")
  return dataclasses.replace(adapters, adapters={**adapters.adapters, new_name: combined})
