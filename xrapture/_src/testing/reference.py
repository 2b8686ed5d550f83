"""Checks a function run on a LoraWeight against the same function on its dense value.

The reference is independent of the code under test: the dense kernel is
``w + scale · b @ a`` computed by hand in numpy (never ``materialize()``), and
gradients come from JAX's autodiff of that formula, not from the handlers'
custom VJPs.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.implicit import interpreter
from xrapture._src.lora import lora_weight
from xrapture._src.testing import dense_check


def _delta_subscripts(layout: str) -> str:
  """The einsum ``b,a->w`` of a layout: one letter per axis of ``w``, ``R`` the rank."""
  letters = "abcdefghijklmnopq"[:len(layout)]
  b = "".join(l for l, c in zip(letters, layout) if c == "s") + "".join(
      l for l, c in zip(letters, layout) if c == "i") + "R"
  a = "".join(l for l, c in zip(letters, layout) if c == "s") + "R" + "".join(
      l for l, c in zip(letters, layout) if c == "o")
  return f"{b},{a}->{letters}"


def delta(lora: lora_weight.LoraWeight, a: Any = None, b: Any = None,
          xp: Any = jnp) -> Any:
  """``scale · b @ a`` laid out like ``w``, by one einsum over the layout."""
  a = lora.a if a is None else a
  b = lora.b if b is None else b
  r = b.shape[-1]
  scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
  return scale * xp.einsum(_delta_subscripts(lora_weight.layout_of(lora)), b, a)


def dense_value(lora: lora_weight.LoraWeight) -> np.ndarray:
  """``w + scale · b @ a`` in numpy (float64 products), in ``w``'s dtype."""
  w, a, b = (np.asarray(x, np.float64) for x in (lora.w, lora.a, lora.b))
  return (w + delta(lora, a, b, np)).astype(np.asarray(lora.w).dtype)


def assert_matches_dense(
    fn: Callable[[Any, Any], Any], x: Any, lora: lora_weight.LoraWeight, *,
    grad_x: bool = True, rtol: float = 2e-4, atol: float = 2e-4,
    hlo: bool = True, seed: int = 99) -> jax.Array:
  """Asserts that ``fn(x, lora)`` behaves as ``fn(x, dense)`` and stays low-rank.

  Under ``xrapture.use_implicit_args``, compares against the dense reference:
  the output, and the gradients wrt ``a``, ``b`` (and ``x`` if ``grad_x``) of
  the loss ``sum(fn(x, W) * c)`` for a fixed random ``c``. Then asserts, with
  :mod:`dense_check`, that neither the forward jaxpr nor the value-and-grad
  jaxpr (nor, with ``hlo``, its compiled HLO) forms a product of ``W``'s
  trailing shape.

  Args:
    fn: ``fn(x, W) -> array``, ordinary JAX code.
    x: its first argument (integer ids are fine with ``grad_x=False``).
    lora: the weight.
    grad_x: also compare the gradient wrt ``x``.
    rtol: relative tolerance for outputs and gradients.
    atol: absolute tolerance for outputs (ten times this for gradients).
    hlo: also search the compiled HLO.
    seed: seed of the loss weights ``c``.

  Returns:
    The output computed on the LoraWeight.
  """
  implicit = interpreter.use_implicit_args(fn)
  dense = jnp.asarray(dense_value(lora))
  ref_aval = jax.eval_shape(fn, x, dense)
  rng = np.random.default_rng(seed)
  ct = jnp.asarray(rng.normal(size=ref_aval.shape), ref_aval.dtype)

  def loss(x, a, b):
    out = implicit(x, lora.replace(a=a, b=b))
    return jnp.sum(out * ct), out

  def dense_loss(x, a, b):
    out = fn(x, lora.w + delta(lora, a, b))
    return jnp.sum(out * ct), out

  argnums = (0, 1, 2) if grad_x else (1, 2)

  # The references run in one jitted program: one compilation instead of one
  # per primitive (op-by-op dispatch compiles every op on its own).
  @jax.jit
  def references(x, dense, a, b):
    grads, _ = jax.grad(dense_loss, argnums, has_aux=True)(x, a, b)
    return fn(x, dense), grads

  value_and_grad = jax.value_and_grad(loss, argnums, has_aux=True)
  traced = jax.jit(value_and_grad).trace(x, lora.a, lora.b)
  compiled = traced.lower().compile()
  (_, out), grads = compiled(x, lora.a, lora.b)
  ref, ref_grads = references(x, dense, lora.a, lora.b)
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol,
                             err_msg="outputs differ")
  for name, g, ref_g in zip(("x", "a", "b")[3 - len(argnums):], grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, rtol=rtol, atol=10 * atol,
                               err_msg=f"gradients wrt {name} differ")
  shapes = dense_check.weight_targets(lora)
  found = [f"forward: {s}" for s in dense_check.find_dense_products(
      implicit, x, lora)]
  found += [f"value_and_grad: {s}" for s in
            dense_check.find_dense_products_in_jaxpr(traced.jaxpr, shapes)]
  if hlo:
    found += [f"hlo: {s}" for s in dense_check.find_dense_products_in_hlo_text(
        compiled.as_text(), shapes)]
  if found:
    raise AssertionError("dense product(s) of the weight's shape "
                         f"{lora.shape}:\n  " + "\n  ".join(found))
  return out
