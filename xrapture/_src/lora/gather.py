"""gather on a LoraWeight: embedding lookups ``W[ids]`` and ``W[:, ids]``.

``hk.Embed``'s default lookup gathers whole rows along one axis. When that
axis is a group of its own (the in group of a ``[V, D]`` table, or the out
group of a tied ``[D, V]`` one), the lookup gathers ``r`` numbers per token
from the factor that holds the axis and contracts them with the other
factor: ``w[ids] + s·b[ids] @ a``. Other gathers return ``NotImplemented``.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
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
  if (getattr(dn, "operand_batching_dims", ()) or len(dn.collapsed_slice_dims) != 1
      or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)):
    return NotImplemented
  axis = dn.collapsed_slice_dims[0]
  if slice_sizes[axis] != 1 or any(
      slice_sizes[d] != lora.shape[d] for d in range(lora.ndim) if d != axis):
    return NotImplemented
  stack, ins, outs = lora.groups
  if stack or (ins, outs).count((axis,)) != 1:
    return NotImplemented
  scale = jnp.asarray(lora.get_scale(), lora.b.dtype)
  r = lora.rank
  if ins == (axis,):   # rows of b [V, r], then contract r with a [r, *out]
    table, other = lora.b * scale, lora.a
  else:                # rows of aᵀ [V, r], then contract r with b [*in, r]
    table, other = lora.a.T, jnp.moveaxis(lora.b * scale, -1, 0)
  dense = interpreter.call(lax.gather, lax.stop_gradient(lora.w), indices, dn,
                           slice_sizes, **params)
  n_batch = dense.ndim - len(dn.offset_dims)
  table_dn = lax.GatherDimensionNumbers(
      offset_dims=(n_batch,), collapsed_slice_dims=(0,), start_index_map=(0,))
  g = lax.gather(table, indices, table_dn, (1, r), **params)     # [*batch, r]
  low = lax.dot_general(g, other, (((n_batch,), (0,)), ((), ())))
  low = jnp.moveaxis(low, tuple(range(n_batch, low.ndim)), tuple(dn.offset_dims))
  return dense + low.astype(dense.dtype)
