"""Primitives that reshape, cast, index or scale a LoraWeight and keep it low-rank.

Each returns a new LoraWeight: transposes, dtype casts (``hk.mixed_precision``),
indexing a stack of kernels on its leading axes (``W[i]`` inside
``hk.layer_stack``-style code), copies, optimization barriers, and
multiplication or division by a scalar. Anything else returns ``NotImplemented``.
"""

import jax
import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight


def _new(lora, w, a, b):
  return LoraWeight(w, a, b, alpha=lora.alpha, rslora=lora.rslora)


@registry.primitive_handler("transpose")
def _transpose(primitive, lora, *, permutation):
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  nd = lora.ndim
  perm = tuple(permutation)
  lead = perm[:-2]
  if sorted(lead) != list(range(nd - 2)):
    return NotImplemented
  if perm[-2:] == (nd - 2, nd - 1):
    return _new(lora, *(jnp.transpose(x, perm) for x in (lora.w, lora.a, lora.b)))
  if perm[-2:] == (nd - 1, nd - 2):
    # (w + s·b@a)ᵀ = wᵀ + s·aᵀ@bᵀ: the new a is bᵀ and the new b is aᵀ.
    return _new(lora, jnp.transpose(lora.w, perm), jnp.transpose(lora.b, perm),
                jnp.transpose(lora.a, perm))
  return NotImplemented


@registry.primitive_handler("convert_element_type")
def _convert(primitive, lora, *, new_dtype, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight) or not jnp.issubdtype(new_dtype, jnp.floating):
    return NotImplemented
  return _new(lora, *(x.astype(new_dtype) for x in (lora.w, lora.a, lora.b)))


@registry.primitive_handler(("copy", "copy_p", "optimization_barrier_p"))
def _copy(primitive, lora, **unused_params):
  del primitive, unused_params
  return lora if isinstance(lora, LoraWeight) else NotImplemented


def _core_untouched(lora, starts, limits, strides=None):
  nd = lora.ndim
  full = all(starts[d] == 0 and limits[d] == lora.shape[d] for d in (nd - 2, nd - 1))
  return full and (strides is None or (strides[-2] == 1 and strides[-1] == 1))


@registry.primitive_handler("slice")
def _slice(primitive, lora, *, start_indices, limit_indices, strides=None):
  del primitive
  if not isinstance(lora, LoraWeight) or not _core_untouched(
      lora, start_indices, limit_indices, strides):
    return NotImplemented

  def cut(x):
    starts, limits = list(start_indices), list(limit_indices)
    for d in range(x.ndim - 2):
      if x.shape[d] == 1 and lora.shape[d] != 1:  # broadcast axis stays
        starts[d], limits[d] = 0, 1
    starts[-2:] = [0, 0]
    limits[-2:] = list(x.shape[-2:])
    st = None if strides is None else [s if x.shape[d] == lora.shape[d] or d >= x.ndim - 2
                                       else 1 for d, s in enumerate(strides)]
    return lax.slice(x, starts, limits, st)
  return _new(lora, cut(lora.w), cut(lora.a), cut(lora.b))


@registry.primitive_handler("dynamic_slice")
def _dynamic_slice(primitive, lora, *starts, slice_sizes):
  del primitive
  if not isinstance(lora, LoraWeight) or any(
      implicit_array.is_implicit(s) for s in starts):
    return NotImplemented
  nd = lora.ndim
  if tuple(slice_sizes[-2:]) != lora.shape[-2:]:
    return NotImplemented

  def cut(x):
    idx, sizes = [], []
    for d in range(nd - 2):
      broadcast = x.shape[d] == 1 and lora.shape[d] != 1
      idx.append(jnp.zeros_like(starts[d]) if broadcast else starts[d])
      sizes.append(1 if broadcast else slice_sizes[d])
    zero = jnp.zeros_like(starts[-1])
    return lax.dynamic_slice(x, idx + [zero, zero], sizes + list(x.shape[-2:]))
  return _new(lora, cut(lora.w), cut(lora.a), cut(lora.b))


@registry.primitive_handler("squeeze")
def _squeeze(primitive, lora, *, dimensions):
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  dims = tuple(d % lora.ndim for d in dimensions)
  if any(d >= lora.ndim - 2 for d in dims) or lora.ndim - len(dims) < 2:
    return NotImplemented
  return _new(lora, *(lax.squeeze(x, dims) for x in (lora.w, lora.a, lora.b)))


def _scalar(x):
  """A concrete scalar (a literal or a constant).

  A traced scalar may be differentiated; folded into ``w``, which handlers
  give no gradient, it would silently lose the ``w`` part of its gradient.
  Products with traced scalars are materialized (with a warning) instead.
  """
  return (not implicit_array.is_implicit(x) and not compat.is_tracer(x)
          and jnp.ndim(x) == 0)


@registry.primitive_handler("mul")
def _mul(primitive, x, y, **unused_params):
  del primitive, unused_params
  lora, c = (x, y) if isinstance(x, LoraWeight) else (y, x)
  if not isinstance(lora, LoraWeight) or not _scalar(c):
    return NotImplemented
  c = jnp.asarray(c, lora.dtype)
  return _new(lora, lora.w * c, lora.a, lora.b * c.astype(lora.b.dtype))


@registry.primitive_handler("div")
def _div(primitive, lora, c, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight) or not _scalar(c):
    return NotImplemented
  c = jnp.asarray(c, lora.dtype)
  return _new(lora, lora.w / c, lora.a, lora.b / c.astype(lora.b.dtype))


@registry.primitive_handler("neg")
def _neg(primitive, lora, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  return _new(lora, -lora.w, lora.a, -lora.b)


@registry.primitive_handler("optimization_barrier")
def _optimization_barrier(primitive, *operands, **unused_params):
  """The barrier holds each LoraWeight's factors; LoraWeights come out."""
  del primitive, unused_params
  if any(implicit_array.is_implicit(x) and not isinstance(x, LoraWeight)
         for x in operands):
    return NotImplemented
  leaves, treedef = jax.tree_util.tree_flatten(list(operands))
  return jax.tree_util.tree_unflatten(treedef, lax.optimization_barrier(leaves))
