"""Haiku parameter paths: ``"module/param"`` strings for a params tree."""

from typing import Any, Callable

import jax

from xrapture._src.implicit import implicit_array


def key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """``("mlp/~/linear_0", "w")`` keys -> ``"mlp/~/linear_0/w"``."""
  return "/".join(key_str(k) for k in path)


def flatten_with_paths(params: Any) -> tuple[list[tuple[str, Any]], Any]:
  """Leaves (ImplicitArrays whole) with their path strings, and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=implicit_array.is_implicit)
  return [(path_str(p), v) for p, v in flat], treedef


def map_with_paths(fn: Callable[[str, Any], Any], params: Any) -> Any:
  """``fn(path, leaf)`` over every leaf; ImplicitArrays are leaves."""
  flat, treedef = flatten_with_paths(params)
  return jax.tree_util.tree_unflatten(treedef, [fn(p, v) for p, v in flat])


def describe(params: Any, limit: int = 60) -> str:
  """One ``path shape dtype`` line per parameter, for error messages."""
  flat, _ = flatten_with_paths(params)
  lines = [f"  {p}  {tuple(getattr(v, 'shape', ()))} {getattr(v, 'dtype', type(v).__name__)}"
           for p, v in flat[:limit]]
  if len(flat) > limit:
    lines.append(f"  ... and {len(flat) - limit} more")
  return "\n".join(lines)
