"""Per-example adapters in one batch (PEFT's ``adapter_names=``).

:func:`mixed_adapter_params` stacks the adapters of an
:class:`xrapture.AdapterSet` into MixedLoraWeights once;
:func:`with_adapter_ids` says, per batch, which adapter each example runs
(cheap: it only sets the ids). Then one forward pass serves them all. The
example is in :func:`mixed_adapter_params`'s docstring (shown in the API docs).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.lora import mixed_lora
from xrapture._src.transform import multi_adapter
from xrapture._src.transform import paths

MixedLoraWeight = mixed_lora.MixedLoraWeight
BASE = multi_adapter.BASE


def mixed_adapter_params(adapters: multi_adapter.AdapterSet,
                         names: Sequence[str] | None = None) -> Any:
  """The base with every kernel that ``names`` adapt as a MixedLoraWeight.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, xrapture
    >>> config = xrapture.default_config(); config.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(3)(x), config)
    >>> x = jnp.ones((3, 4))
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> adapters = xrapture.AdapterSet(base)
    >>> adapters = xrapture.add_adapter(adapters, "fr", model.adapt(jax.random.PRNGKey(1), base))
    >>> adapters = xrapture.add_adapter(adapters, "de", model.adapt(jax.random.PRNGKey(2), base))
    >>> stacked = xrapture.mixed_adapter_params(adapters)
    >>> params = xrapture.with_adapter_ids(stacked, ["de", "__base__", "fr"])
    >>> model.apply(params, None, x).shape
    (3, 3)

  Args:
    adapters: the set.
    names: the adapters to serve, in slot order (default: all of them).

  Returns:
    A params tree: each adapted kernel holds every named adapter's factors
    (an adapter without that kernel contributes zeros); other leaves are
    the base's. Give it ids with :func:`with_adapter_ids` before ``apply``.

  Raises:
    ValueError: an unknown name (the message lists those there are); a DoRA
      adapter (PEFT has no mixed batches with DoRA either); an adapter that
      trains parameters in full (one base value is shared by all examples);
      adapters of one kernel with different layouts.
  """
  names = list(adapters.names if names is None else names)
  for name in names:
    multi_adapter._check_name(adapters, name)  # pylint: disable=protected-access
  base_flat, treedef = paths.flatten_with_paths(adapters.base)
  per_adapter = [multi_adapter._flat(adapters.adapters[n]) for n in names]  # pylint: disable=protected-access
  out = []
  for i, (path, base) in enumerate(base_flat):
    loras = []
    for name, factors in zip(names, per_adapter):
      f = factors[i]
      if isinstance(f, dora.DoraWeight):
        raise ValueError(f"Adapter {name!r} is a DoRA adapter ('{path}'): mixed "
                         "batches take LoRA adapters only (as PEFT's adapter_names).")
      if f is not implicit_array.EmptyNode and not isinstance(f, lora_weight.LoraWeight):
        raise ValueError(f"Adapter {name!r} trains '{path}' in full; in a mixed batch "
                         "all examples share the base's value. Add it to the "
                         "AdapterSet without lora_spec to serve its LoRA part.")
      loras.append(f.replace(w=base) if isinstance(f, lora_weight.LoraWeight) else None)
    present = [l for l in loras if l is not None]
    if not present:
      out.append(base)
      continue
    layouts = {lora_weight.layout_of(l) for l in present}
    if len(layouts) > 1:
      raise ValueError(f"The adapters of '{path}' have different layouts {sorted(layouts)}.")
    layout = layouts.pop()
    a, b = mixed_lora.stacked_factors(loras, layout, tuple(np.shape(base)))
    out.append(MixedLoraWeight(base, a, b, None, layout=layout, names=tuple(names)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _is_mixed(x: Any) -> bool:
  return isinstance(x, MixedLoraWeight)


def with_adapter_ids(params: Any, ids: Any) -> Any:
  """``params`` whose MixedLoraWeights run example ``e`` with adapter ``ids[e]``.

  Args:
    params: from :func:`mixed_adapter_params`.
    ids: one entry per example (the leading axis of the batch): adapter
      names (``"__base__"`` for the base alone) or slot numbers (``-1`` for
      the base); an int array may be traced (pass it through ``jax.jit``).

  Returns:
    ``params`` with the ids set; nothing else is copied.

  Raises:
    ValueError: ``params`` hold no MixedLoraWeight; a name is not served
      (the message lists those that are) or a concrete id is out of range.
  """
  mixed = [x for x in jax.tree_util.tree_leaves(params, is_leaf=_is_mixed) if _is_mixed(x)]
  if not mixed:
    raise ValueError("params hold no MixedLoraWeight; build them with "
                     "xrapture.mixed_adapter_params(adapters, names).")
  names = mixed[0].names
  if isinstance(ids, (list, tuple)) and any(isinstance(i, str) for i in ids):
    unknown = sorted({i for i in ids if isinstance(i, str) and i != BASE and i not in names})
    if unknown:
      raise ValueError(f"Adapters {unknown} are not in this mixed batch; it serves "
                       f"{list(names)} (and {BASE!r}).")
    ids = [-1 if i == BASE else names.index(i) if isinstance(i, str) else int(i)
           for i in ids]
  if not compat.is_tracer(ids):
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be one integer (or name) per example, got {ids!r}.")
    bad = sorted(set(ids[(ids < -1) | (ids >= len(names))].tolist()))
    if bad:
      raise ValueError(f"adapter ids {bad} out of range: valid are -1 (the base) to "
                       f"{len(names) - 1} ({list(names)}).")
  ids = jnp.asarray(ids, jnp.int32)
  return jax.tree_util.tree_map(
      lambda x: mixed_lora.broadcast_ids(x, ids) if _is_mixed(x) else x,
      params, is_leaf=_is_mixed)
