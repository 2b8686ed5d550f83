"""conv_general_dilated with a LoraWeight kernel.

A conv contracts its kernel over the window and the input channels, so the
matrix a conv LoRA factors is ``[prod(window) · in, out]``: layout ``'i'``
on the window and input-feature axes, ``'o'`` on the output-feature axis
(HWIO ``'iiio'``, ``hk.Conv2DTranspose``'s HWOI ``'iioi'``). Then ``b`` is a
conv kernel with ``r`` output features and ``a`` a pointwise channel matmul:
the update is a conv with ``b`` followed by ``@ a``. When the window goes
with the output features instead (0.1.0's ``b``-pointwise form), it is a
channel matmul followed by a conv with the other factor. Pointwise factors
commute with strides, padding and dilations, so both are exact. Grouped
convs, stacked axes and windows split across the groups return
``NotImplemented`` (materialized with a warning). An implicit (quantized)
base kernel is convolved by its own handlers.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.lora import dropout
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight
IN, OUT = lora_weight.IN, lora_weight.OUT


def _channel_matmul(x, feature_dim, mat, mat_axis, precision):
  """Contracts ``x``'s feature axis with ``mat``'s ``mat_axis``, in place."""
  y = lax.dot_general(x, mat, (((feature_dim,), (mat_axis,)), ((), ())),
                      precision=precision)
  return jnp.moveaxis(y, -1, feature_dim)


def low_rank_layout(layout: str, shape, rhs_spec) -> tuple[str | None, str | None]:
  """``(form, layout)`` for a conv with this kernel, or ``(None, None)``.

  The kernel's input- and output-feature axes must be in different groups
  and the window axes all in one of them: with the input features the
  factor holding them is a conv kernel with ``r`` output features
  (``'conv_first'``); with the output features the other factor is a
  pointwise channel matmul first (``'pointwise_first'``). Window axes of
  size 1 may be in any group: the returned layout moves them to the
  window's. Other stacked axes have no low-rank form.
  """
  out_dim, in_dim, *window = rhs_spec
  if {layout[in_dim], layout[out_dim]} != {IN, OUT}:
    return None, None
  roles = {layout[d] for d in window if shape[d] != 1}
  if not roles or roles == {layout[in_dim]}:
    form, role = "conv_first", layout[in_dim]
  elif roles == {layout[out_dim]}:
    form, role = "pointwise_first", layout[out_dim]
  else:
    return None, None
  return form, "".join(role if d in window else c for d, c in enumerate(layout))


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
  layout = lora_weight.layout_of(lora)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  form, new_layout = low_rank_layout(layout, lora.shape, rhs_spec)
  if form is None or new_layout is None:  # both None or neither
    return NotImplemented
  if new_layout != layout:  # size-1 window axes join the window's group
    lora, layout = lora.with_layout(new_layout), new_layout
  out_dim, in_dim = rhs_spec[0], rhs_spec[1]
  conv_kw = dict(params, dimension_numbers=dimension_numbers,
                 feature_group_count=1, batch_group_count=1, precision=precision)
  dense = interpreter.call(
      lax.conv_general_dilated, lhs, lax.stop_gradient(lora.w),
      preferred_element_type=preferred_element_type, **conv_kw)
  # (factor, its rank axis) for the group of each feature axis: b [*in, r] or
  # a [r, *out]; the scale goes into b.
  scaled_b = (lora.b * jnp.asarray(lora.get_scale(), lora.b.dtype), lora.b.ndim - 1)
  factor = {IN: scaled_b, OUT: (lora.a, 0)}
  (f_in, r_in), (f_out, r_out) = factor[layout[in_dim]], factor[layout[out_dim]]
  lhs_low = dropout.maybe_drop(lhs)
  # Adapters may have another dtype than the activations (config.dtype); unlike
  # dot_general, conv_general_dilated needs equal operand dtypes: promote.
  if form == "conv_first":
    # The input-feature factor spans the window: a kernel with r outputs.
    kernel = jnp.moveaxis(f_in, r_in, out_dim)
    dtype = jnp.promote_types(lhs_low.dtype, kernel.dtype)
    y = lax.conv_general_dilated(lhs_low.astype(dtype), kernel.astype(dtype), **conv_kw)
    low = _channel_matmul(y, out_spec[1], f_out, r_out, precision)
  else:
    # Channels -> r pointwise, then the output-feature factor as a kernel.
    x = _channel_matmul(lhs_low, lhs_spec[1], f_in, 1 - r_in, precision)
    kernel = jnp.moveaxis(f_out, r_out, in_dim)
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    low = lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype),
        preferred_element_type=preferred_element_type, **conv_kw)
  return dense + low.astype(dense.dtype)
