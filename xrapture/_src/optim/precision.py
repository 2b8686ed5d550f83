"""Optimizer math in float32 for low-precision (float16, bfloat16) parameters.

Adam's ``eps`` (1e-8) underflows to zero in float16, so a zero gradient (an
adapter's ``a`` on the first step, while ``b`` is still zero) gives ``0 / 0``.
The wrapped optimizer sees float32 copies of low-precision gradients and
params, keeps its state in float32, and returns updates in each parameter's
own dtype.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _low_precision(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits < 32)


def _upcast(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if _low_precision(x) else x, tree)


def float32_math(tx: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
  """Runs ``tx`` in float32 for float16 / bfloat16 leaves.

  Args:
    tx: any optax optimizer.

  Returns:
    The same optimizer, with float32 state for low-precision leaves and
    updates cast back to each gradient's dtype. Float32 and float64 leaves
    are passed through untouched.
  """
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    return tx.init(_upcast(params))

  def update_fn(updates, state, params=None, **extra_args):
    new, state = tx.update(_upcast(updates), state,
                           None if params is None else _upcast(params), **extra_args)
    new = jax.tree.map(
        lambda n, u: n.astype(u.dtype) if _low_precision(u) else n, new, updates)
    return new, state
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
