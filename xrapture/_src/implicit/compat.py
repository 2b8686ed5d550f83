"""Everything that differs between JAX releases, in one place.

The interpreter walks jaxprs, so it depends on equation names and parameter
layouts that JAX has renamed over time. Each such detail is read here and
nowhere else:

* ``pjit`` became ``jit`` (0.7); ``jit``'s ``inline`` became an enum (0.11).
* ``custom_vjp_call_jaxpr(fun_jaxpr=...)`` became ``custom_vjp_call(call_jaxpr=...)``.
* ``Primitive.get_bind_params`` returns ``(subfuns, params)`` before 0.5 and a
  params dict (with ``subfuns`` inside) after.
* ``scan``'s ``num_consts``/``num_carry`` are read through :func:`scan_counts`.
* ``ClosedJaxpr`` merges into ``Jaxpr`` (0.12): :func:`jaxpr_and_consts`.
"""

from typing import Any, Sequence

import jax
import jax.extend.core as jex_core

JIT_NAMES = frozenset({"jit", "pjit"})
CALL_NAMES = frozenset({"closed_call", "core_call", "call"})
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

  Read from the equation's params where JAX names them (``num_consts`` /
  ``num_carry`` up to 0.10); otherwise derived from types alone: the carry
  is what the body returns unstacked and takes back, ``xs`` and ``ys`` are
  stacked along ``length``. Raises if the types leave the split ambiguous.
  """
  params = eqn.params
  if "num_consts" in params and "num_carry" in params:
    return params["num_consts"], params["num_carry"]
  return _derive_scan_counts(eqn)


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
