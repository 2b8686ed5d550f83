"""Optax wrappers that freeze parts of a parameter tree.

Frozen leaves get zero updates and hold no optimizer state: the wrapped
optimizer only ever sees the trainable leaves (``optax.multi_transform``
masks the rest), so Adam keeps moments for the adapters alone.
"""

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from xrapture._src.implicit import implicit_array

_FREEZE, _TRAIN = "freeze", "train"


def _zero_dtype(update: Any, param: Any) -> Any:
  """A dtype ``optax.apply_updates`` can add to ``param``.

  Gradients of integer parameters are float0 (``jax.grad(allow_int=True)``),
  which supports no arithmetic: zeros take the parameter's dtype instead, or
  bool (adding False changes nothing) when params are not given.
  """
  if param is not None and hasattr(param, "dtype"):
    return param.dtype
  if update.dtype == jax.dtypes.float0:
    return jnp.bool_
  return update.dtype


def _zeros(scalar: bool) -> optax.GradientTransformation:
  """Like ``optax.set_to_zero``; scalar zeros if ``scalar``, no float0."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      params = jax.tree.map(lambda _: None, updates)
    def zero(u, p):
      if u is None:   # an absent child (a QuantizedArray without double quant)
        return None
      return jnp.zeros(() if scalar else u.shape, _zero_dtype(u, p))
    return jax.tree.map(zero, updates, params, is_leaf=lambda x: x is None), state
  return optax.GradientTransformation(init_fn, update_fn)


def _labels_from_bools(frozen: Any, params: Any) -> Any:
  """Expands a (prefix) tree of bools over ``params``, leaf by leaf.

  Matching goes by key path, not by tree structure, so a flag tree built
  from a class's default metadata (say a LoraWeight without the layout the
  params' LoraWeights record) still labels the params: the flag of a leaf is
  the one at the longest prefix of its path.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(
      frozen, is_leaf=lambda x: isinstance(x, bool))
  flags = {tuple(path): flag for path, flag in flat}

  def label(path, _):
    path = tuple(path)
    for n in range(len(path), -1, -1):
      if path[:n] in flags:
        return _FREEZE if flags[path[:n]] else _TRAIN
    raise ValueError(
        f"freeze labels give no flag for parameter "
        f"{jax.tree_util.keystr(path)}: pass a bool for it or for a subtree "
        "above it.")
  return jax.tree_util.tree_map_with_path(label, params)


def freeze_subtrees(
    tx: optax.GradientTransformation,
    labels: Any | Callable[[Any], Any],
    use_scalar_zeros: bool = False,
) -> optax.GradientTransformation:
  """Wraps ``tx`` so that subtrees labelled frozen are never updated.

  Args:
    tx: the optimizer for the trainable leaves.
    labels: a pytree matching ``params`` or a prefix of it, with ``True``
      where frozen (a whole subtree, such as a LoraWeight, may take one
      bool); or a function from params to such a tree.
    use_scalar_zeros: give frozen leaves scalar zero updates instead of
      full-size zeros (``optax.apply_updates`` broadcasts them).

  Returns:
    An optimizer whose state holds nothing for frozen leaves.
  """
  def label_fn(params):
    flags = labels(params) if callable(labels) else labels
    return _labels_from_bools(flags, params)

  zero = _zeros(use_scalar_zeros)
  return optax.multi_transform({_TRAIN: tx, _FREEZE: zero}, label_fn)


def freeze_keys(
    tx: optax.GradientTransformation,
    cls: type[implicit_array.ImplicitArray],
    keys: str | Iterable[str],
    use_scalar_zeros: bool = False,
) -> optax.GradientTransformation:
  """Wraps ``tx`` so that fields ``keys`` of every ``cls`` instance are frozen.

  ``freeze_keys(tx, xrapture.LoraWeight, "w")`` trains only the adapters of
  every LoraWeight and leaves the other parameters to ``tx``.

  Args:
    tx: the optimizer for everything not frozen.
    cls: an ImplicitArray subclass (a pytree dataclass).
    keys: field names of ``cls`` to freeze.
    use_scalar_zeros: as in :func:`freeze_subtrees`.

  Returns:
    The wrapped optimizer.
  """
  keys = (keys,) if isinstance(keys, str) else tuple(keys)

  def flags(params):
    def one(x):
      if isinstance(x, cls):
        return implicit_array.map_fields(lambda name, _: name in keys, x)
      return jax.tree.map(lambda _: False, x)
    return implicit_array.tree_map_with_implicit(one, params)
  return freeze_subtrees(tx, flags, use_scalar_zeros)
