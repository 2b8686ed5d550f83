"""ImplicitArray: a pytree that stands for an array it never forms.

A subclass declares its array-valued children as plain dataclass fields and
its static metadata with :func:`aux_field`; it defines ``shape``, ``dtype`` and
:meth:`ImplicitArray.materialize`. Subclasses become dataclasses and pytrees
automatically, so ``jax.jit``, ``jax.grad`` and optax see their children.
"""

import dataclasses
import sys
from typing import Any, Callable

import jax
import numpy as np

if sys.version_info >= (3, 11):
  from typing import dataclass_transform
else:  # Only tells type checkers that subclasses are dataclasses.
  dataclass_transform = lambda **_: lambda cls: cls

_AUX = "xrapture_aux"


def aux_field(**kwargs) -> Any:
  """A dataclass field stored as static pytree metadata (not a child)."""
  metadata = dict(kwargs.pop("metadata", {}) or {})
  metadata[_AUX] = True
  return dataclasses.field(metadata=metadata, **kwargs)


@dataclass_transform(field_specifiers=(dataclasses.field, aux_field))
class ImplicitArray:
  """Base class of arrays represented implicitly.

  Subclasses are turned into dataclasses and registered as pytrees (children:
  fields not declared with :func:`aux_field`, with attribute keys, so paths
  read ``params['linear']['w'].a``). Unflattening skips ``__post_init__``, so
  JAX may rebuild an instance around non-array leaves (tracers, ``None``,
  optimizer labels) without tripping validation.
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "__dataclass_fields__" not in cls.__dict__:
      dataclasses.dataclass(cls)
    _register(cls)

  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError(f"{type(self).__name__} must define shape.")

  @property
  def dtype(self) -> np.dtype:
    raise NotImplementedError(f"{type(self).__name__} must define dtype.")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def aval(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.shape, self.dtype)

  def materialize(self) -> jax.Array:
    """Returns the dense array this value stands for."""
    raise NotImplementedError(f"{type(self).__name__} must define materialize.")

  def scannable(self, length: int) -> bool:
    """Whether slicing every child's leading axis gives this value's slices.

    ``lax.scan`` over an implicit value slices each child; by default that
    is right when every child has leading axis ``length``. Subclasses whose
    children may have such an axis by coincidence override this.
    """
    return all(getattr(x, "ndim", 0) >= 1 and x.shape[0] == length
               for x in jax.tree_util.tree_leaves(self))

  def __jax_array__(self):
    raise TypeError(
        f"A {type(self).__name__} reached a JAX operation outside "
        "xrapture.use_implicit_args. Wrap the function with "
        "xrapture.use_implicit_args (xrapture.transform does this for Haiku), "
        "or call .materialize() / xrapture.materialize_nested first.")


def _children_and_aux(cls):
  fields = dataclasses.fields(cls)
  children = tuple(f.name for f in fields if not f.metadata.get(_AUX))
  aux = tuple(f.name for f in fields if f.metadata.get(_AUX))
  return children, aux


def _register(cls):
  # The field names are read once here, not on every call: jit flattens
  # every implicit leaf of a step's params and optimizer state before XLA
  # starts, and ``dataclasses.fields`` made a flatten 4.7x slower.
  children, aux = _children_and_aux(cls)
  keys = tuple(jax.tree_util.GetAttrKey(n) for n in children)

  def flatten_with_keys(obj):
    return ([(k, getattr(obj, n)) for k, n in zip(keys, children)],
            tuple([getattr(obj, n) for n in aux]))

  def flatten(obj):
    return [getattr(obj, n) for n in children], tuple([getattr(obj, n) for n in aux])

  def unflatten(aux_values, child_values):
    obj = object.__new__(cls)
    for name, value in zip(children, child_values):
      object.__setattr__(obj, name, value)
    for name, value in zip(aux, aux_values):
      object.__setattr__(obj, name, value)
    return obj

  jax.tree_util.register_pytree_with_keys(
      cls, flatten_with_keys, unflatten, flatten_func=flatten)


def is_implicit(x: Any) -> bool:
  """True if ``x`` is an ImplicitArray (of any subclass)."""
  return isinstance(x, ImplicitArray)


class _EmptyNodeType:
  """A pytree node with no children: marks a removed subtree."""

  _instance = None

  def __new__(cls):
    if cls._instance is None:
      cls._instance = super().__new__(cls)
    return cls._instance

  def __repr__(self):
    return "EmptyNode"


jax.tree_util.register_pytree_node(
    _EmptyNodeType, lambda _: ((), None), lambda *_: _EmptyNodeType())

EmptyNode = _EmptyNodeType()


def tree_map_with_implicit(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` that treats every ImplicitArray as a leaf."""
  return jax.tree_util.tree_map(fn, tree, *rest, is_leaf=is_implicit)


def map_fields(fn: Callable[[str | None, Any], Any], obj: ImplicitArray) -> Any:
  """Rebuilds ``obj`` with each leaf replaced by ``fn(field_name, leaf)``.

  The result is unvalidated: leaves may become labels, ``None`` or
  ``EmptyNode`` (optimizer masks, trainable-only checkpoints).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(obj)
  return jax.tree_util.tree_unflatten(
      treedef, [fn(getattr(p[0], "name", None), v) for p, v in flat])


def materialize_nested(tree: Any) -> Any:
  """Replaces every ImplicitArray in ``tree`` by its dense array.

  Implicit children of implicit values are materialized first.
  """
  def one(x):
    if not is_implicit(x):
      return x
    inner = jax.tree_util.tree_map(
        lambda c: materialize_nested(c), x, is_leaf=lambda c: c is not x and is_implicit(c))
    return inner.materialize()
  return tree_map_with_implicit(one, tree)
