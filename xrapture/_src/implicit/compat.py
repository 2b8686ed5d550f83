"""Everything that differs between JAX releases, in one place.

The interpreter walks jaxprs, so it depends on equation names and parameter
layouts that JAX has renamed over time. Each such detail is read here and
nowhere else (``jax.extend`` is imported by this module only):

* ``pjit`` became ``jit`` (0.7); ``jit``'s ``inline`` became an enum (0.11.2):
  the interpreter inlines a nested jit itself and binds ``inline`` unread.
* ``custom_vjp_call_jaxpr(fun_jaxpr=...)`` became ``custom_vjp_call(call_jaxpr=...)``.
* ``closed_call`` became the primitive ``eval_jaxpr`` (0.11.1): both are in
  :data:`CALL_NAMES`.
* ``Primitive.get_bind_params`` returns ``(subfuns, params)`` before 0.5 and a
  params dict (with ``subfuns`` inside) after.
* ``scan``'s ``num_consts``/``num_carry`` became the flat trees ``ft_in`` /
  ``ft_out`` (0.11.0): read through :func:`scan_counts`.
* ``ClosedJaxpr`` merged into ``Jaxpr`` (0.11.0; ``ClosedJaxpr`` is an alias,
  and a ``Jaxpr`` holds its consts): :func:`jaxpr_and_consts`.
* Which operands a primitive's sub-jaxprs read: :func:`sub_jaxprs`.
"""

from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.extend.core as jex_core

JIT_NAMES = frozenset({"jit", "pjit"})
CALL_NAMES = frozenset({"closed_call", "core_call", "call", "eval_jaxpr"})
REMAT_NAMES = frozenset({"remat2", "checkpoint", "remat"})
CUSTOM_JVP_NAMES = frozenset({"custom_jvp_call"})
CUSTOM_VJP_NAMES = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})

Literal = jex_core.Literal
DropVar = jex_core.DropVar


def jaxpr_and_consts(jaxpr: Any) -> tuple[Any, Sequence[Any]]:
  """Returns ``(open jaxpr, consts)`` for a ClosedJaxpr or an open Jaxpr."""
  if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr, "consts"):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, getattr(jaxpr, "consts", ())


def is_jaxpr(value: Any) -> bool:
  """Whether ``value`` is a Jaxpr or a ClosedJaxpr (one class since 0.11)."""
  return isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr))


class SubJaxpr(NamedTuple):
  """A jaxpr held in an equation's params.

  Attributes:
    param: the params key that holds it (``"jaxpr"``, ``"branches"``, ...).
    jaxpr: as stored, a Jaxpr or ClosedJaxpr (open it with
      :func:`jaxpr_and_consts`).
    operands: for each of its invars, the index into ``eqn.invars`` of the
      operand it receives; None where JAX does not say (a primitive this
      module does not know whose sub-jaxpr's arity differs from the
      equation's).
  """
  param: str
  jaxpr: Any
  operands: tuple[int, ...] | None


def sub_jaxprs(eqn: Any) -> Iterator[SubJaxpr]:
  """Every jaxpr in ``eqn``'s params, with the operands its invars receive.

  ``cond`` branches receive the operands after the index; ``while``'s
  ``cond_jaxpr`` its consts and the carry, ``body_jaxpr`` its consts and the
  carry; call-like primitives (jit, remat, ``closed_call``/``eval_jaxpr``,
  custom_jvp/vjp calls, scan) receive all operands in order (scan's ``xs``
  sliced: see :func:`scan_counts`).
  """
  n = len(eqn.invars)
  name, params = eqn.primitive.name, eqn.params
  if name == "while":
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    yield SubJaxpr("cond_jaxpr", params["cond_jaxpr"],
                   tuple(range(nc)) + tuple(range(nc + nb, n)))
    yield SubJaxpr("body_jaxpr", params["body_jaxpr"], tuple(range(nc, n)))
    return
  for key, value in params.items():
    for sub in (value if isinstance(value, (tuple, list)) else (value,)):
      if not is_jaxpr(sub):
        continue
      arity = len(jaxpr_and_consts(sub)[0].invars)
      if name == "cond" and key == "branches":
        operands = tuple(range(1, n))
      else:
        operands = tuple(range(n))
      yield SubJaxpr(key, sub, operands if len(operands) == arity else None)


def custom_call_jaxpr(params: dict[str, Any]) -> Any:
  """The primal jaxpr of a custom_jvp_call / custom_vjp_call equation."""
  for key in ("call_jaxpr", "fun_jaxpr"):
    if key in params:
      return params[key]
  raise KeyError(f"no call jaxpr among params {sorted(params)}")


def custom_call_name(eqn: Any) -> str:
  """The user function behind a custom_jvp/custom_vjp call, for messages."""
  name = eqn.params.get("name")
  if name is None:
    jaxpr, _ = jaxpr_and_consts(custom_call_jaxpr(eqn.params))
    name = getattr(getattr(jaxpr, "debug_info", None), "func_name", None)
  return str(name or eqn.primitive.name)


def scan_counts(eqn: Any) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a scan equation.

  Read from the equation's params: ``num_consts`` / ``num_carry`` up to 0.10,
  the flat trees ``ft_in`` = (consts, carry, xs) and ``ft_out`` = (carry, ys)
  since 0.11. Otherwise derived from types alone: the carry is what the body
  returns unstacked and takes back, ``xs`` and ``ys`` are stacked along
  ``length``. Raises if the types leave the split ambiguous.
  """
  params = eqn.params
  if "num_consts" in params and "num_carry" in params:
    return params["num_consts"], params["num_carry"]
  counts = _flat_tree_scan_counts(eqn)
  if counts is not None:
    return counts
  return _derive_scan_counts(eqn)


def _flat_tree_scan_counts(eqn: Any) -> tuple[int, int] | None:
  """Counts from ``ft_in``/``ft_out`` (JAX >= 0.11), or None if unreadable.

  JAX itself splits the operands with ``ft_in.update(args).unpack()``; the
  same split of operand positions gives the counts.
  """
  ft_in, ft_out = eqn.params.get("ft_in"), eqn.params.get("ft_out")
  if ft_in is None or ft_out is None:
    return None
  try:
    consts, carry, xs = (list(part) for part in
                         ft_in.update(range(len(eqn.invars))).unpack())
    carry_out, ys = (list(part) for part in
                     ft_out.update(range(len(eqn.outvars))).unpack())
  except (AttributeError, TypeError, ValueError, AssertionError):
    return None
  if (len(consts) + len(carry) + len(xs) != len(eqn.invars)
      or len(carry_out) != len(carry) or len(carry_out) + len(ys) != len(eqn.outvars)):
    return None
  return len(consts), len(carry)


def _derive_scan_counts(eqn: Any) -> tuple[int, int]:
  body, _ = jaxpr_and_consts(eqn.params["jaxpr"])
  length = eqn.params["length"]
  key = lambda aval: (tuple(aval.shape), str(aval.dtype))
  stacked = lambda outer, inner: key(outer) == ((length,) + key(inner)[0], key(inner)[1])
  ins = [v.aval for v in eqn.invars]
  outs = [v.aval for v in eqn.outvars]
  body_ins = [v.aval for v in body.invars]
  body_outs = [v.aval for v in body.outvars]
  found = []
  for num_carry in range(len(outs) + 1):
    if not all(key(outs[i]) == key(body_outs[i]) for i in range(num_carry)):
      continue
    if not all(stacked(outs[i], body_outs[i]) for i in range(num_carry, len(outs))):
      continue
    for num_consts in range(len(ins) - num_carry + 1):
      carry = range(num_consts, num_consts + num_carry)
      ok = (all(key(ins[j]) == key(body_ins[j]) for j in range(num_consts + num_carry))
            and all(key(body_ins[j]) == key(body_outs[j - num_consts]) for j in carry)
            and all(stacked(ins[j], body_ins[j])
                    for j in range(num_consts + num_carry, len(ins))))
      if ok:
        found.append((num_consts, num_carry))
  if len(found) != 1:
    raise NotImplementedError(
        f"this JAX ({jax.__version__}) names scan's parameters {sorted(eqn.params)}; "
        f"xrapture could not tell consts, carry and xs apart ({len(found)} "
        "readings fit the types). Please report it with your JAX version.")
  return found[0]


def bind_equation(eqn: Any, invals: Sequence[Any]) -> list[Any]:
  """Binds ``eqn``'s primitive to ``invals`` exactly as ``jax.core.eval_jaxpr``."""
  prim = eqn.primitive
  bind_params = prim.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.5: (subfuns, params)
    subfuns, bind_params = bind_params
    invals = [*subfuns, *invals]
  ctx = getattr(eqn, "ctx", None)
  manager = getattr(ctx, "manager", None)
  if manager is not None:
    with manager:
      out = prim.bind(*invals, **bind_params)
  else:
    out = prim.bind(*invals, **bind_params)
  return list(out) if prim.multiple_results else [out]


def aval_key(x: Any) -> tuple[Any, ...]:
  """A hashable description of an array's abstract value."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
  return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)))


def placeholder(shape: Sequence[int], dtype: Any, weak_type: bool = False):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, weak_type=weak_type)


def is_unspecified_sharding(sharding: Any) -> bool:
  return sharding is None or type(sharding).__name__ in (
      "UnspecifiedValue", "AUTO")


def is_tracer(x: Any) -> bool:
  """Whether ``x`` is a value being traced (under jit, grad, vmap, ...)."""
  return isinstance(x, jax.core.Tracer)
