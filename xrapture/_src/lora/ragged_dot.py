"""ragged_dot with a LoraWeight of per-group (per-expert) kernels.

``lax.ragged_dot(x, w, group_sizes)`` multiplies consecutive row groups of
``x [m, k]`` by ``w [G, k, n]``, the grouped matmul of mixture-of-experts
layers. With ``w`` stacked along its group axis (layout ``'sio'``: one
adapter per expert) the low-rank path is two more grouped matmuls through
the rank: ``ragged_dot(x, w) + s · ragged_dot(ragged_dot(x, b), a)``. The
base kernel's gradient is stopped, so the backward pass computes none for
it. Multi-axis in/out groups are reshaped to the grouped matrix first.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight


def _ragged(x, w, group_sizes, contract_x, ragged_x, precision, pet, group_offset):
  """``ragged_dot_general`` of ``x`` (contracting its ``contract_x`` axis) with ``w [G, K, N]``."""
  dn = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((contract_x,), (1,)), ((), ())),
      lhs_ragged_dimensions=(ragged_x,), rhs_group_dimensions=(0,))
  return lax.ragged_dot_general(x, w, group_sizes, dn, precision=precision,
                                preferred_element_type=pet,
                                group_offset=group_offset)


@registry.primitive_handler(("ragged_dot_general", "ragged_dot"))
def _ragged_dot(primitive, lhs, rhs, group_sizes, **params):
  if not isinstance(rhs, LoraWeight) or any(
      implicit_array.is_implicit(v) for v in (lhs, group_sizes)):
    return NotImplemented
  lora = rhs
  dn = params.get("ragged_dot_dimension_numbers")
  if dn is None:  # the older ragged_dot primitive: x [m, k], w [G, k, n]
    dn = lax.RaggedDotDimensionNumbers((((1,), (1,)), ((), ())), (0,), (0,))
  (lc, rc), (lb, rb) = dn.dot_dimension_numbers
  stack, ins, outs = lora.groups
  if (lb or rb or tuple(dn.rhs_group_dimensions) != stack or len(stack) != 1
      or set(rc) != set(ins) or len(dn.lhs_ragged_dimensions) != 1
      or dn.lhs_ragged_dimensions[0] in lc):
    return NotImplemented
  precision = params.get("precision")
  group_offset = params.get("group_offset")
  # x's contracted axes, in w's order, flattened into one after its free axes.
  pairs = dict(zip(rc, lc))
  x_free = [d for d in range(lhs.ndim) if d not in lc]
  x = jnp.transpose(lhs, x_free + [pairs[d] for d in sorted(rc)])
  x = x.reshape(x.shape[:len(x_free)] + (-1,))
  ragged = x_free.index(dn.lhs_ragged_dimensions[0])
  n_groups = lora.shape[stack[0]]
  in_size, out_size = lora.grouped_shape
  r = lora.rank
  b = lora.b * jnp.asarray(lora.get_scale(), lora.b.dtype)
  b = b.reshape(n_groups, in_size, r)
  a = lora.a.reshape(n_groups, r, out_size)
  u = _ragged(x, b, group_sizes, x.ndim - 1, ragged, precision, None, group_offset)
  low = _ragged(u, a, group_sizes, u.ndim - 1, ragged, precision,
                params.get("preferred_element_type"), group_offset)
  low = low.reshape(low.shape[:-1] + tuple(lora.shape[d] for d in outs))
  dense = interpreter.call(primitive.bind, lhs, lax.stop_gradient(lora.w),
                           group_sizes, **params)
  return dense + low.astype(dense.dtype)
