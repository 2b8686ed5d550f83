"""Interpreter rules for primitives that hold jaxprs, when implicit values enter.

Each rule rebuilds the primitive through its public API (``jax.checkpoint``,
``lax.scan``, ...) around a function that interprets the sub-jaxpr, so the
implicit values travel inside without being formed. Where JAX requires a dense
value of fixed structure (a loop carry, a cond output), it is materialized
with a warning.
"""

import contextlib
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import randomness
from xrapture._src.implicit import registry

is_implicit = implicit_array.is_implicit


def _materialize_all(values, reason):
  return [registry.materialize(v, reason) for v in values]


@registry.higher_order_rule(tuple(compat.JIT_NAMES))
def _jit_rule(eqn, invals):
  """Inlines a nested jit; its output shardings are kept as constraints."""
  outs = interpreter.eval_closed_jaxpr(eqn.params["jaxpr"], invals)
  shardings = eqn.params.get("out_shardings") or ()
  constrained = []
  for out, sharding in zip(outs, shardings):
    if not is_implicit(out) and not compat.is_unspecified_sharding(sharding):
      out = lax.with_sharding_constraint(out, sharding)
    constrained.append(out)
  return constrained + outs[len(constrained):]


@registry.higher_order_rule(tuple(compat.CALL_NAMES))
def _call_rule(eqn, invals):
  return interpreter.eval_closed_jaxpr(eqn.params["call_jaxpr"], invals)


@registry.higher_order_rule(tuple(compat.REMAT_NAMES))
def _remat_rule(eqn, invals):
  jaxpr = eqn.params["jaxpr"]

  def body(*args):
    return interpreter.eval_closed_jaxpr(jaxpr, args)

  return jax.checkpoint(
      body,
      prevent_cse=eqn.params.get("prevent_cse", True),
      policy=eqn.params.get("policy"))(*invals)


def _scannable(value, length):
  return value.scannable(length)


@registry.higher_order_rule(("scan",))
def _scan_rule(eqn, invals):
  params = eqn.params
  num_consts, num_carry = compat.scan_counts(eqn)
  length = params["length"]
  consts = invals[:num_consts]
  init = _materialize_all(invals[num_consts:num_consts + num_carry],
                          "an implicit value in a scan carry")
  xs = []
  for x in invals[num_consts + num_carry:]:
    if is_implicit(x) and not _scannable(x, length):
      x = registry.materialize(
          x, f"scan over an implicit value whose parts do not all have "
          f"leading axis {length}")
    xs.append(x)
  body_jaxpr = params["jaxpr"]
  steps = jnp.arange(length, dtype=jnp.int32) if randomness.active() else None

  def body(carry, step_and_x):
    step, x = step_and_x
    with randomness.loop_step(step) if step is not None else contextlib.nullcontext():
      outs = interpreter.eval_closed_jaxpr(body_jaxpr, [*consts, *carry, *x])
    new_carry = _materialize_all(outs[:num_carry], "an implicit value in a scan carry")
    return new_carry, outs[num_carry:]

  carry, ys = lax.scan(body, init, (steps, xs), length=length,
                       reverse=params.get("reverse", False),
                       unroll=params.get("unroll", 1))
  return [*carry, *ys]


@registry.higher_order_rule(("while",))
def _while_rule(eqn, invals):
  params = eqn.params
  n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
  cond_consts = invals[:n_cond]
  body_consts = invals[n_cond:n_cond + n_body]
  init = _materialize_all(invals[n_cond + n_body:],
                          "an implicit value in a while_loop carry")

  def cond_fun(step_and_carry):
    _, carry = step_and_carry
    return interpreter.eval_closed_jaxpr(params["cond_jaxpr"], [*cond_consts, *carry])[0]

  def body_fun(step_and_carry):
    step, carry = step_and_carry
    with randomness.loop_step(step):
      outs = interpreter.eval_closed_jaxpr(params["body_jaxpr"], [*body_consts, *carry])
    return step + 1, _materialize_all(outs, "an implicit value in a while_loop carry")

  return lax.while_loop(cond_fun, body_fun, (jnp.int32(0), init))[1]


@registry.higher_order_rule(("cond",))
def _cond_rule(eqn, invals):
  index, *operands = invals
  if is_implicit(index):
    index = registry.materialize(index, "an implicit cond predicate")

  def branch_fn(branch):
    def run(*ops):
      outs = interpreter.eval_closed_jaxpr(branch, ops)
      return _materialize_all(outs, "an implicit value returned from a cond branch")
    return run

  return lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *operands)


@registry.higher_order_rule(tuple(compat.CUSTOM_JVP_NAMES | compat.CUSTOM_VJP_NAMES))
def _custom_derivative_rule(eqn, invals):
  """Inlines the primal function; its custom derivative rule is dropped."""
  name = compat.custom_call_name(eqn)
  warnings.warn(
      f"custom derivative rule of '{name}' dropped: an implicit value flows "
      "into it, so its primal function is differentiated directly.",
      registry.CustomRuleDroppedWarning, stacklevel=2)
  return interpreter.eval_closed_jaxpr(compat.custom_call_jaxpr(eqn.params), invals)
