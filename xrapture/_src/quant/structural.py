"""Primitives that transpose, cast or index a QuantizedArray and keep it quantized.

Transposes (of leading axes, or of the last two, which flips the blocked
axis), casts to another float dtype (``hk.mixed_precision``), and slicing or
squeezing leading (stacked) axes, as ``W[i]`` does, return a new
QuantizedArray; copies return it unchanged. Anything else returns
``NotImplemented``.
"""

import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray


def _map_lead(q, fn, **changes):
  """A copy with ``fn(child, lead_ndim_of_q)`` applied to every child array."""
  lead = q.ndim - 2
  children = {f: getattr(q, f) for f in ("codes", "absmax", "absmax2", "offset")}
  children = {f: None if c is None else fn(c, lead) for f, c in children.items()}
  return q.replace(**children, **changes)


@registry.primitive_handler("transpose")
def _transpose(primitive, q, *, permutation):
  del primitive
  if not isinstance(q, QuantizedArray):
    return NotImplemented
  nd = q.ndim
  perm = tuple(permutation)
  if sorted(perm[:-2]) != list(range(nd - 2)):
    return NotImplemented
  axis = q.axis if perm[-2:] == (nd - 2, nd - 1) else {-2: -1, -1: -2}[q.axis]

  def permute(child, lead):
    return jnp.transpose(child, perm[:lead] + tuple(range(lead, child.ndim)))
  return _map_lead(q, permute, axis=axis)


@registry.primitive_handler("convert_element_type")
def _convert(primitive, q, *, new_dtype, **unused_params):
  del primitive, unused_params
  if not isinstance(q, QuantizedArray) or not jnp.issubdtype(new_dtype, jnp.floating):
    return NotImplemented
  return q.replace(dense_dtype=new_dtype)


@registry.primitive_handler(("copy", "copy_p", "optimization_barrier_p"))
def _copy(primitive, q, **unused_params):
  del primitive, unused_params
  return q if isinstance(q, QuantizedArray) else NotImplemented


def _last_two_whole(q, starts, limits, strides=None):
  nd = q.ndim
  whole = all(starts[d] == 0 and limits[d] == q.shape[d] for d in (nd - 2, nd - 1))
  return whole and (strides is None or (strides[-2] == 1 and strides[-1] == 1))


@registry.primitive_handler("slice")
def _slice(primitive, q, *, start_indices, limit_indices, strides=None):
  del primitive
  if not isinstance(q, QuantizedArray) or not _last_two_whole(
      q, start_indices, limit_indices, strides):
    return NotImplemented

  def cut(child, lead):
    starts = list(start_indices[:lead]) + [0] * (child.ndim - lead)
    limits = list(limit_indices[:lead]) + list(child.shape[lead:])
    steps = None if strides is None else list(strides[:lead]) + [1] * (child.ndim - lead)
    return lax.slice(child, starts, limits, steps)
  return _map_lead(q, cut)


@registry.primitive_handler("dynamic_slice")
def _dynamic_slice(primitive, q, *starts, slice_sizes):
  del primitive
  if not isinstance(q, QuantizedArray) or any(
      implicit_array.is_implicit(s) for s in starts):
    return NotImplemented
  if tuple(slice_sizes[-2:]) != tuple(q.shape[-2:]):
    return NotImplemented

  def cut(child, lead):
    zero = jnp.zeros_like(starts[-1])
    index = list(starts[:lead]) + [zero] * (child.ndim - lead)
    return lax.dynamic_slice(child, index, list(slice_sizes[:lead]) + list(child.shape[lead:]))
  return _map_lead(q, cut)


@registry.primitive_handler("squeeze")
def _squeeze(primitive, q, *, dimensions):
  del primitive
  if not isinstance(q, QuantizedArray):
    return NotImplemented
  dims = tuple(d % q.ndim for d in dimensions)
  if any(d >= q.ndim - 2 for d in dims):
    return NotImplemented
  return _map_lead(q, lambda child, lead: lax.squeeze(child, dims))
