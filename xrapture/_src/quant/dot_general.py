"""dot_general with a QuantizedArray operand: dequantize at the call site, then multiply.

The dequantized kernel lives only inside this one product. The product runs
under ``jax.checkpoint``, so the backward pass keeps the quantized children
(not the dense kernel) between the forward and backward passes and
dequantizes again where it needs the kernel for the input gradient.
No gradient flows to the quantized array. Any dimension numbers, either
operand.
"""

import jax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray


@registry.primitive_handler("dot_general")
def _dot_general(primitive, lhs, rhs, **params):
  if isinstance(rhs, QuantizedArray) and not implicit_array.is_implicit(lhs):
    def product(x, q):
      return primitive.bind(x, quantized_array.dequantize(q), **params)
    return jax.checkpoint(product)(lhs, rhs)
  if isinstance(lhs, QuantizedArray) and not implicit_array.is_implicit(rhs):
    def product(q, x):
      return primitive.bind(quantized_array.dequantize(q), x, **params)
    return jax.checkpoint(product)(lhs, rhs)
  return NotImplemented
