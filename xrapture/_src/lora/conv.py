"""conv_general_dilated with a LoraWeight kernel.

A conv kernel ``[*window, in, out]`` (``hk.Conv1D/2D``: HWIO) or
``[*window, out, in]`` (``hk.Conv2DTranspose``: HWOI) is adapted with one
factor that spans the window and one that is pointwise (leading axes of size
1). Because the pointwise factor only mixes channels, it commutes with
strides, padding and dilations: the update is a conv with the rank-``r``
factor plus a channel matmul, in the order the kernel layout requires.
Grouped convs return ``NotImplemented`` (materialized with a warning).
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import dropout
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight


def _channel_matmul(x, feature_dim, mat, mat_axis, precision):
  """Contracts ``x``'s feature axis with ``mat``'s ``mat_axis``, in place."""
  y = lax.dot_general(x, mat, (((feature_dim,), (mat_axis,)), ((), ())),
                      precision=precision)
  return jnp.moveaxis(y, -1, feature_dim)


@registry.primitive_handler("conv_general_dilated")
def _conv(primitive, lhs, rhs, *, dimension_numbers, feature_group_count,
          batch_group_count, precision=None, preferred_element_type=None,
          **params):
  del primitive
  if not isinstance(rhs, LoraWeight) or implicit_array.is_implicit(lhs):
    return NotImplemented
  if feature_group_count != 1 or batch_group_count != 1:
    return NotImplemented
  lora = rhs
  nd = lora.ndim
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  out_dim, in_dim = rhs_spec[0], rhs_spec[1]
  if {out_dim, in_dim} != {nd - 2, nd - 1}:
    return NotImplemented

  def pointwise(x):
    return all(d == 1 for d in x.shape[:-2])

  conv_kw = dict(params, dimension_numbers=dimension_numbers,
                 feature_group_count=1, batch_group_count=1, precision=precision)
  dense = lax.conv_general_dilated(
      lhs, lax.stop_gradient(lora.w), preferred_element_type=preferred_element_type,
      **conv_kw)
  scale = jnp.asarray(lora.get_scale(), lora.b.dtype)
  if pointwise(lora.a):
    # mat = a [r, N] touches the kernel's axis nd-1; the conv kernel is s·b.
    mat, kernel, touches = lax.squeeze(lora.a, range(nd - 2)), lora.b * scale, nd - 1
    in_axis, out_axis = 1, 0
  elif pointwise(lora.b):
    # mat = s·b [M, r] touches the kernel's axis nd-2; the conv kernel is a.
    mat, kernel, touches = lax.squeeze(lora.b, range(nd - 2)) * scale, lora.a, nd - 2
    in_axis, out_axis = 0, 1
  else:
    return NotImplemented
  lhs_low = dropout.maybe_drop(lhs)
  # Adapters may have another dtype than the activations (spec.dtype); unlike
  # dot_general, conv_general_dilated needs equal operand dtypes: promote.
  if touches == in_dim:   # channels -> r pointwise, then conv r -> out
    x = _channel_matmul(lhs_low, lhs_spec[1], mat, in_axis, precision)
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    low = lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype),
        preferred_element_type=preferred_element_type, **conv_kw)
  else:                   # conv in -> r, then r -> channels pointwise
    dtype = jnp.promote_types(lhs_low.dtype, kernel.dtype)
    y = lax.conv_general_dilated(lhs_low.astype(dtype), kernel.astype(dtype), **conv_kw)
    low = _channel_matmul(y, out_spec[1], mat, out_axis, precision)
  return dense + low.astype(dense.dtype)
