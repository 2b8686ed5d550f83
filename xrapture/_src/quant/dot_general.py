"""Products with a QuantizedArray operand: dequantize at the call site, then multiply.

``dot_general`` (either operand, any dimension numbers), and a quantized
kernel as the right operand of ``conv_general_dilated`` or
``ragged_dot_general`` / ``ragged_dot`` (grouped matmuls of per-expert
kernels). The dequantized kernel lives only inside one product: each
product is a ``jax.custom_vjp`` whose residual is the quantized array (not
the dense kernel), and whose backward pass dequantizes it again for the
input gradient. No gradient flows to the quantized array.

An NF4 kernel enters a ``dot_general`` as its two nibble halves (the values
at even and at odd positions of its blocked axis), each multiplied on its
own: dequantizing into one interleaved kernel cost XLA:CPU twice the
product itself, and a QLoRA step 2-4x a LoRA step (benchmarks/qlora.py).

Each dequantization is tied to the other operand of its product (a zero
derived from it is added to the codes): the forward product's kernel
depends on the activations, the backward pass's on the incoming gradient.
Otherwise XLA, seeing one kernel dequantized twice from the same codes,
computes it once in the forward pass and keeps it alive until the backward
pass: every kernel in full precision at once. (XLA:CPU expands optimization
barriers before common-subexpression elimination, so a barrier does not
prevent that; a data dependency does.)
"""

import jax
import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray
dequantize_half = quantized_array.dequantize_half


def _tied(q: QuantizedArray, anchor: jax.Array) -> QuantizedArray:
  """``q`` whose codes depend on (are computed after) ``anchor``."""
  if anchor.size:
    zero = (anchor.reshape(-1)[0] * 0).astype(q.codes.dtype)
    q = q.replace(codes=lax.stop_gradient(q.codes) + zero)
  return q


def _split_dot(primitive, ops, k, params):
  """``dot_general`` with ``ops[k]`` an NF4 array, from its two nibble halves.

  The product is linear in the kernel, and the kernel is its high-nibble
  values on the even positions of the blocked axis plus its low-nibble
  values on the odd ones. Where the blocked axis is contracted, each half
  meets the even (odd) slice of the other operand and the two products add;
  where it is a free axis, the two products interleave along the output
  axis it becomes (activation-sized work). None where it is a batch axis.
  """
  q, x = ops[k], ops[1 - k]
  n = len(q.shape)
  packed = n - 2 if q.axis == -2 else n - 1
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  q_contract, x_contract = (lc, rc) if k == 0 else (rc, lc)
  q_batch = lb if k == 0 else rb
  if packed in q_batch:
    return None
  bind = lambda x, w: primitive.bind(*((w, x) if k == 0 else (x, w)), **params)
  # The low half is dequantized after (from) the high half's product, so
  # that one half of the kernel is alive at a time.
  if packed in q_contract:
    axis = x_contract[list(q_contract).index(packed)]
    even = lax.slice_in_dim(x, 0, None, stride=2, axis=axis)
    odd = lax.slice_in_dim(x, 1, None, stride=2, axis=axis)
    y_hi = bind(even, dequantize_half(q, True))
    return y_hi + bind(odd, dequantize_half(_tied(q, y_hi), False))
  q_free = [d for d in range(n) if d not in q_contract and d not in q_batch]
  lhs_free = (n if k == 0 else x.ndim) - len(lc) - len(lb)
  out_axis = len(lb) + (0 if k == 0 else lhs_free) + q_free.index(packed)
  y_hi = bind(x, dequantize_half(q, True))
  y_lo = bind(x, dequantize_half(_tied(q, y_hi), False))
  y = jnp.stack([y_hi, y_lo], axis=out_axis + 1)
  shape = list(y.shape[:out_axis]) + [2 * y.shape[out_axis]] + list(y.shape[out_axis + 2:])
  return y.reshape(shape)


def _bind_dequantized(primitive, operands, params):
  """``primitive`` on ``operands``, exactly one a QuantizedArray, linear in the others.

  Float operands get gradients (their cotangent computed with the kernel
  dequantized again, tied to the cotangent); other operands (integer group
  sizes) are saved as they are.
  """
  k = next(i for i, x in enumerate(operands) if isinstance(x, QuantizedArray))
  floats = [i for i, x in enumerate(operands)
            if i != k and jnp.issubdtype(x.dtype, jnp.inexact)]
  anchor_of = lambda ops: ops[floats[0]] if floats else jnp.zeros((0,))

  def run(ops, anchor):
    ops = list(ops)
    ops[k] = _tied(ops[k], anchor)
    if primitive.name == "dot_general" and ops[k].scheme == "nf4":
      out = _split_dot(primitive, ops, k, params)
      if out is not None:
        return out
    ops[k] = quantized_array.dequantize(ops[k])
    return primitive.bind(*ops, **params)

  @jax.custom_vjp
  def product(*ops):
    return run(ops, anchor_of(ops))

  def fwd(*ops):
    return run(ops, anchor_of(ops)), ops   # the codes, not the dense kernel

  def bwd(saved, g):
    # The product is linear in each float operand: its vjp at zero is exact.
    point = [jnp.zeros_like(saved[i]) for i in floats]

    def linear(*xs):
      ops = list(saved)
      for i, x in zip(floats, xs):
        ops[i] = x
      return run(ops, g)
    _, vjp = jax.vjp(linear, *point)
    cts = dict(zip(floats, vjp(g)))
    return tuple(cts.get(i) for i in range(len(saved)))

  product.defvjp(fwd, bwd)
  return product(*operands)


@registry.primitive_handler("dot_general")
def _dot_general(primitive, lhs, rhs, **params):
  quantized = [isinstance(x, QuantizedArray) for x in (lhs, rhs)]
  implicit = [implicit_array.is_implicit(x) for x in (lhs, rhs)]
  if quantized.count(True) != 1 or implicit.count(True) != 1:
    return NotImplemented
  return _bind_dequantized(primitive, (lhs, rhs), params)


@registry.primitive_handler(("conv_general_dilated", "ragged_dot_general", "ragged_dot"))
def _kernel_product(primitive, lhs, rhs, *rest, **params):
  """A quantized right operand (the kernel); every other operand dense."""
  if not isinstance(rhs, QuantizedArray) or any(
      implicit_array.is_implicit(x) for x in (lhs, *rest)):
    return NotImplemented
  return _bind_dequantized(primitive, (lhs, rhs, *rest), params)
