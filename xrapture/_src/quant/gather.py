"""gather of whole rows from a 2-D QuantizedArray (``hk.Embed``'s lookup ``W[ids]``).

When the gathered axis is not the blocked one, the codes and absmax rows are
gathered first and only those rows are dequantized. Gathers along the
blocked axis, and any other gather, return ``NotImplemented``.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray


@registry.primitive_handler("gather")
def _gather(primitive, q, indices, *, dimension_numbers, slice_sizes, **params):
  del primitive
  if not isinstance(q, QuantizedArray) or implicit_array.is_implicit(indices):
    return NotImplemented
  dn = dimension_numbers
  if (q.ndim != 2 or len(dn.offset_dims) != 1
      or getattr(dn, "operand_batching_dims", None) or len(dn.collapsed_slice_dims) != 1
      or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)):
    return NotImplemented
  axis = dn.collapsed_slice_dims[0]
  kept = 1 - axis
  blocked = q.axis % 2
  if axis == blocked or slice_sizes[axis] != 1 or slice_sizes[kept] != q.shape[kept]:
    return NotImplemented
  # Children hold the gathered axis first: gather whole rows of each.
  rows = dn._replace(collapsed_slice_dims=(0,), start_index_map=(0,))

  def take(child):
    return lax.gather(child, indices, rows, (1, child.shape[1]), **params)

  codes, scales = take(q.codes), take(quantized_array.block_scales(q))
  off = dn.offset_dims[0]
  dense = quantized_array.dequantize_rows(
      jnp.moveaxis(codes, off, -1), jnp.moveaxis(scales, off, -1), q.scheme, q.dtype)
  return jnp.moveaxis(dense, -1, off)
