"""use_implicit_args: run unmodified JAX code on implicit arrays.

The function is traced once to a jaxpr with each implicit argument replaced by
a placeholder of its dense shape and dtype; the jaxpr is then evaluated with
the real values. Equations without implicit operands are bound unchanged, so
JAX's own rules (custom derivatives of activations, shardings) are kept.
Equations with implicit operands go to the registry: a higher-order rule for
primitives holding jaxprs, otherwise the registered handlers, otherwise
materialization.
"""

import collections
import functools
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from xrapture._src import pytypes
from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry

is_implicit = implicit_array.is_implicit


def _leaf_kind(x: Any) -> str:
  if is_implicit(x):
    return "implicit"
  if pytypes.is_array(x):
    return "dynamic"
  return "static"


# Traces kept per wrapped function; the least recently used one goes first.
DEFAULT_MAX_TRACES = 128


def _static_key(x: Any) -> Any:
  """The cache key part of a non-array leaf: the leaf itself (kept alive)."""
  hash(x)  # TypeError for unhashable leaves, reported by _unhashable_error
  return ("static", type(x), x)


def _argument_name(args_and_kwargs: Any, index: int) -> str:
  """``args[1]`` / ``kwargs['mode'].x``: where flat leaf ``index`` sits."""
  flat, _ = jax.tree_util.tree_flatten_with_path(args_and_kwargs, is_leaf=is_implicit)
  path = flat[index][0]
  head = "args" if getattr(path[0], "idx", 0) == 0 else "kwargs"
  return head + jax.tree_util.keystr(tuple(path[1:]))


def _unhashable_error(f, args_and_kwargs, index, leaf, error) -> TypeError:
  name = getattr(f, "__qualname__", None) or repr(f)
  return TypeError(
      f"Argument {_argument_name(args_and_kwargs, index)} of {name} is an "
      f"unhashable {type(leaf).__module__}.{type(leaf).__qualname__} ({error}). "
      "use_implicit_args passes non-array arguments to the traced function "
      "as static values and caches one trace per value (as jax.jit does for "
      "static arguments), so they must be hashable. Make it hashable (e.g. "
      "@dataclasses.dataclass(frozen=True), or a tuple instead of a list "
      "inside it), or register its class as a pytree "
      "(jax.tree_util.register_dataclass / register_pytree_node) so that its "
      "array fields are traced as arrays.")


class _Traced:
  __slots__ = ("jaxpr", "consts", "out_tree")

  def __init__(self, jaxpr, consts, out_tree):
    self.jaxpr, self.consts, self.out_tree = jaxpr, consts, out_tree


def use_implicit_args(f: Callable[..., Any], *,
                      max_traces: int = DEFAULT_MAX_TRACES) -> Callable[..., Any]:
  """Makes ``f`` accept ImplicitArrays anywhere in its (pytree) arguments.

  ``f`` itself is unmodified JAX code: it sees dense-looking values, while each
  primitive that touches an implicit array is routed to its registered handler
  (see :func:`xrapture.primitive_handler`). Works under ``jax.jit``,
  ``jax.grad``, ``jax.vmap`` and with sharded inputs; the traced jaxpr is
  cached per argument structure, shapes and static values (non-array leaves,
  which must be hashable, as ``jax.jit``'s static arguments).

  Examples:
    >>> import jax.numpy as jnp, xrapture
    >>> w = xrapture.LoraWeight(jnp.ones((3, 2)), jnp.ones((1, 2)), jnp.ones((3, 1)))
    >>> xrapture.use_implicit_args(lambda x, w: x @ w)(jnp.ones((1, 3)), w)
    Array([[6., 6.]], dtype=float32)

  Args:
    f: the function to run.
    max_traces: how many traces to keep; beyond it the least recently used
      one is dropped (and traced again if needed).

  Returns:
    A function with ``f``'s signature. Implicit arrays in its outputs (values
    a handler returned unchanged) are returned as they are. Calling it
    raises TypeError, naming the argument, when a non-array leaf of the
    arguments is unhashable.
  """
  if max_traces < 1:
    raise ValueError(f"max_traces must be at least 1, got {max_traces}")
  cache: collections.OrderedDict[Any, _Traced] = collections.OrderedDict()
  lock = threading.Lock()

  @functools.wraps(f)
  def wrapped(*args, **kwargs):
    leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_implicit)
    kinds = [_leaf_kind(x) for x in leaves]
    key_parts = []
    for i, (kind, x) in enumerate(zip(kinds, leaves)):
      if kind == "implicit":
        key_parts.append(("implicit", tuple(x.shape), str(np.dtype(x.dtype))))
      elif kind == "dynamic":
        key_parts.append(("dynamic",) + compat.aval_key(x))
      else:
        try:
          key_parts.append(_static_key(x))
        except Exception as e:  # pylint: disable=broad-except
          raise _unhashable_error(f, (args, kwargs), i, x, e) from None
    key = (in_tree, tuple(key_parts))
    with lock:
      traced = cache.get(key)
      if traced is not None:
        cache.move_to_end(key)
    if traced is None:
      traced = _trace(f, in_tree, kinds, leaves)
      with lock:
        cache[key] = traced
        while len(cache) > max_traces:
          cache.popitem(last=False)
    dynamic = [x for kind, x in zip(kinds, leaves) if kind != "static"]
    out_flat = eval_jaxpr(traced.jaxpr, traced.consts, *dynamic)
    return jax.tree_util.tree_unflatten(traced.out_tree, out_flat)

  wrapped.cache_size = lambda: len(cache)  # type: ignore[attr-defined]
  return wrapped


@functools.lru_cache(maxsize=256)
def _implicit_version(fn: Callable[..., Any]) -> Callable[..., Any]:
  return use_implicit_args(fn)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)``, with implicit arrays among the arguments dispatched.

  For handlers whose operands hold implicit children (an implicit array
  nested in another): ``call(lax.dot_general, x, child, dims)`` runs the
  registered handlers for the child, where ``lax.dot_general(x, child,
  dims)`` would fail. Without implicit arguments it is ``fn(*args,
  **kwargs)``, unchanged. ``fn`` should be a module-level function or a
  primitive's ``bind`` (one trace is cached per function, argument
  structure and static values), not a fresh lambda.

  Returns:
    ``fn``'s result; an implicit array where a handler returned one.
  """
  leaves = jax.tree_util.tree_leaves((args, kwargs), is_leaf=is_implicit)
  if not any(is_implicit(x) for x in leaves):
    return fn(*args, **kwargs)
  try:
    wrapped = _implicit_version(fn)
  except TypeError:  # an unhashable callable: trace it afresh
    wrapped = use_implicit_args(fn)
  return wrapped(*args, **kwargs)


def _trace(f, in_tree, kinds, leaves) -> _Traced:
  placeholders = []
  for kind, x in zip(kinds, leaves):
    if kind == "implicit":
      placeholders.append(compat.placeholder(x.shape, x.dtype))
    elif kind == "dynamic":
      shape, dtype, weak = compat.aval_key(x)
      placeholders.append(compat.placeholder(shape, dtype, weak))
  out_tree_box = []

  def flat_fn(*dynamic):
    it = iter(dynamic)
    full = [x if kind == "static" else next(it) for kind, x in zip(kinds, leaves)]
    args, kwargs = jax.tree_util.tree_unflatten(in_tree, full)
    out = f(*args, **kwargs)
    out_flat, out_tree = jax.tree_util.tree_flatten(out)
    out_tree_box.append(out_tree)
    return out_flat

  closed = jax.make_jaxpr(flat_fn)(*placeholders)
  jaxpr, consts = compat.jaxpr_and_consts(closed)
  return _Traced(jaxpr, consts, out_tree_box[0])


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Evaluates an open jaxpr whose inputs may be implicit arrays."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, compat.Literal) else env[v]

  def write(v, value):
    if not isinstance(v, compat.DropVar):
      env[v] = value

  for v, value in zip(jaxpr.constvars, consts):
    write(v, value)
  if len(jaxpr.invars) != len(args):
    raise TypeError(f"jaxpr expects {len(jaxpr.invars)} inputs, got {len(args)}")
  for v, value in zip(jaxpr.invars, args):
    write(v, value)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(is_implicit(x) for x in invals):
      outvals = _eval_implicit_equation(eqn, invals)
    else:
      outvals = compat.bind_equation(eqn, invals)
    for v, value in zip(eqn.outvars, outvals):
      write(v, value)
  return [read(v) for v in jaxpr.outvars]


def eval_closed_jaxpr(closed: Any, args: Sequence[Any]) -> list[Any]:
  jaxpr, consts = compat.jaxpr_and_consts(closed)
  return eval_jaxpr(jaxpr, consts, *args)


def _eval_implicit_equation(eqn, invals) -> list[Any]:
  name = eqn.primitive.name
  rule = registry.higher_order_rule_for(name)
  if rule is not None:
    return list(rule(eqn, invals))
  for handler in registry.handlers_for(name):
    out = handler(eqn.primitive, *invals, **eqn.params)
    if out is NotImplemented:
      continue
    outs = list(out) if eqn.primitive.multiple_results else [out]
    _check_outputs(eqn, outs, handler)
    return outs
  reason = f"no handler for primitive '{name}' accepted these operands"
  invals = [registry.materialize(x, reason) for x in invals]
  return compat.bind_equation(eqn, invals)


def _check_outputs(eqn, outs, handler):
  if len(outs) != len(eqn.outvars):
    raise TypeError(
        f"handler {handler.__qualname__} for '{eqn.primitive.name}' returned "
        f"{len(outs)} values, expected {len(eqn.outvars)}")
  for i, (v, out) in enumerate(zip(eqn.outvars, outs)):
    expected = tuple(v.aval.shape)
    if tuple(out.shape) != expected:
      raise TypeError(
          f"handler {handler.__qualname__} for '{eqn.primitive.name}' returned "
          f"shape {tuple(out.shape)}, the primitive gives {expected}")
    if not is_implicit(out) and out.dtype != v.aval.dtype:
      outs[i] = out.astype(v.aval.dtype)
