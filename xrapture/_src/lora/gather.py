"""gather on a 2-D LoraWeight: embedding lookups ``W[ids]`` and ``W[:, ids]``.

``hk.Embed``'s default lookup gathers whole rows: ``w[ids] + s·b[ids] @ a``,
so only ``r`` numbers per token are gathered from the adapter. Column
gathers are the mirror image. Other gathers return ``NotImplemented``.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight


@registry.primitive_handler("gather")
def _gather(primitive, lora, indices, *, dimension_numbers, slice_sizes,
            **params):
  del primitive
  if not isinstance(lora, LoraWeight) or implicit_array.is_implicit(indices):
    return NotImplemented
  dn = dimension_numbers
  if (lora.ndim != 2 or len(dn.offset_dims) != 1
      or getattr(dn, "operand_batching_dims", ()) or len(dn.collapsed_slice_dims) != 1
      or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)):
    return NotImplemented
  axis = dn.collapsed_slice_dims[0]
  kept = 1 - axis
  if slice_sizes[axis] != 1 or slice_sizes[kept] != lora.shape[kept]:
    return NotImplemented
  scale = jnp.asarray(lora.get_scale(), lora.b.dtype)
  r = lora.rank
  if axis == 0:   # rows: gather b [M, r], then contract r with a [r, N]
    gathered, sizes, other, other_axis = lora.b * scale, (1, r), lora.a, 0
  else:           # columns: gather a [r, N], then contract r with b [M, r]
    gathered, sizes, other, other_axis = lora.a, (r, 1), lora.b * scale, 1
  dense = lax.gather(lax.stop_gradient(lora.w), indices, dn, slice_sizes, **params)
  g = lax.gather(gathered, indices, dn, sizes, **params)
  off = dn.offset_dims[0]
  low = lax.dot_general(g, other, (((off,), (other_axis,)), ((), ())))
  low = jnp.moveaxis(low, -1, off)
  return dense + low.astype(dense.dtype)
