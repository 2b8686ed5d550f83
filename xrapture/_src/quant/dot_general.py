"""Products with a QuantizedArray operand: dequantize at the call site, then multiply.

``dot_general`` (either operand, any dimension numbers), and a quantized
kernel as the right operand of ``conv_general_dilated`` or
``ragged_dot_general`` / ``ragged_dot`` (grouped matmuls of per-expert
kernels). The dequantized kernel lives only inside this one product. The
product runs under ``jax.checkpoint``, so the backward pass keeps the
quantized children (not the dense kernel) between the forward and backward
passes and dequantizes again where it needs the kernel for the input
gradient. No gradient flows to the quantized array.
"""

import jax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray


def _bind_dequantized(primitive, operands, params):
  """``primitive`` on ``operands`` with the QuantizedArray among them dequantized."""
  def product(*ops):
    dense = [quantized_array.dequantize(x) if isinstance(x, QuantizedArray) else x
             for x in ops]
    return primitive.bind(*dense, **params)
  return jax.checkpoint(product)(*operands)


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
