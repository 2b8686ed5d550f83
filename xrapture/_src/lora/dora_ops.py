"""JAX primitives on a DoraWeight, through the LoRA handlers plus a per-column scale.

A DoraWeight is ``c ⊙ (w + s·b@a)`` with ``c = magnitude / ‖w + s·b@a‖_c``
constant along the in group. So a ``dot_general`` whose output keeps the
kernel's out axes is the LoRA product scaled on those output axes, and one
that contracts the out axes (a tied unembedding ``x @ E.T``) is the LoRA
product of the input scaled on the matching axes. A conv is scaled on its
output feature axis; an embedding lookup on its feature axis (or, gathered
along the out axis, by the gathered scales). The LoRA part never forms
``b @ a`` (see :mod:`dot_general`), nor does the norm (see :mod:`dora`).

With LoRA dropout, as PEFT: ``y = x·w + (c - 1)·(x_d·w) + c·s·x_d·b·a`` for
the dropped input ``x_d``, i.e. ``x·w - x_d·w + x_d·W'``.

Casts, copies and transposes keep the DoraWeight; PEFT has no DoRA for
per-expert kernels (``ragged_dot``): an error says so. Anything else is
materialized (with a warning; an error in strict mode).
"""

import contextlib

import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import conv as conv_lib
from xrapture._src.lora import dora
from xrapture._src.lora import dot_general as dot_general_lib
from xrapture._src.lora import dropout
from xrapture._src.lora import gather as gather_lib
from xrapture._src.lora import lora_weight
from xrapture._src.lora import structural

DoraWeight = dora.DoraWeight


def _place(c, axes, ndim):
  """``c`` (its axes going to positions ``axes`` of an ``ndim`` array), size 1 elsewhere."""
  c = jnp.transpose(c, tuple(np.argsort(axes)))
  shape = [1] * ndim
  for pos, size in zip(sorted(axes), c.shape):
    shape[pos] = size
  return c.reshape(shape)


@contextlib.contextmanager
def _no_dropout():
  with dropout.lora_dropout(0.0, None):
    yield


def _with_dropout(x, dense_fn, effective_fn):
  """``effective_fn(x)``, or with LoRA dropout PEFT's ``x·w - x_d·w + x_d·W'``."""
  if not dropout.active():
    return effective_fn(x)
  x_d = dropout.maybe_drop(x)
  with _no_dropout():
    low = effective_fn(x_d)
  return dense_fn(x) - dense_fn(x_d) + low


@registry.primitive_handler("dot_general")
def _dot_general(primitive, lhs, rhs, *, dimension_numbers, precision=None,
                 preferred_element_type=None, **params):
  w_lhs = isinstance(lhs, DoraWeight)
  if not (w_lhs or isinstance(rhs, DoraWeight)):
    return NotImplemented
  weight, x = (lhs, rhs) if w_lhs else (rhs, lhs)
  if implicit_array.is_implicit(x):
    return NotImplemented
  (lc, rc), (lb, rb) = dimension_numbers
  w_contract, x_contract = (lc, rc) if w_lhs else (rc, lc)
  w_batch, x_batch = (lb, rb) if w_lhs else (rb, lb)
  stack, _, outs = weight.groups
  if any(d in w_contract for d in stack):
    return NotImplemented
  kw = dict(dimension_numbers=dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type, **params)
  lora = weight.lora()
  c = weight.column_scale()
  out_ndim = len(w_batch) + weight.ndim + x.ndim - 2 * len(w_contract) - 2 * len(w_batch)

  def lora_dot(x):
    args = (lora, x) if w_lhs else (x, lora)
    return dot_general_lib._dot_general(primitive, *args, **kw)  # pylint: disable=protected-access

  def dense(x):
    w = lax.stop_gradient(weight.w)
    return lax.dot_general(*((w, x) if w_lhs else (x, w)), dimension_numbers,
                           precision=precision,
                           preferred_element_type=preferred_element_type)

  contracted_outs = [d in w_contract for d in outs]
  if not any(contracted_outs):
    # Output positions of w's stacked and out axes: batch axes first, then
    # the lhs's free axes, then the rhs's.
    w_free = [d for d in range(weight.ndim) if d not in w_contract and d not in w_batch]
    x_free = x.ndim - len(x_contract) - len(x_batch)
    first = len(w_batch) + (0 if w_lhs else x_free)
    pos = {d: w_batch.index(d) if d in w_batch else first + w_free.index(d)
           for d in stack + outs}
    scale = _place(c, [pos[d] for d in stack + outs], out_ndim)

    def effective(x):
      y = lora_dot(x)
      return (y * scale.astype(y.dtype)).astype(y.dtype)
  elif all(contracted_outs) and all(d in w_batch for d in stack):
    # Scale the input along the axes it contracts with w's out axes.
    pos = {d: x_contract[w_contract.index(d)] for d in outs}
    pos.update({d: x_batch[w_batch.index(d)] for d in stack})
    scale = _place(c, [pos[d] for d in stack + outs], x.ndim)

    def effective(x):
      return lora_dot((x * scale.astype(x.dtype)).astype(x.dtype))
  else:
    return NotImplemented
  return _with_dropout(x, dense, effective)


@registry.primitive_handler("conv_general_dilated")
def _conv(primitive, lhs, rhs, *, dimension_numbers, feature_group_count,
          batch_group_count, precision=None, preferred_element_type=None, **params):
  if not isinstance(rhs, DoraWeight) or implicit_array.is_implicit(lhs):
    return NotImplemented
  stack, _, outs = rhs.groups
  _, rhs_spec, out_spec = dimension_numbers
  if (stack or tuple(outs) != (rhs_spec[0],) or feature_group_count != 1
      or batch_group_count != 1
      or conv_lib.low_rank_layout(lora_weight.layout_of(rhs), rhs.shape, rhs_spec)[0] is None):
    return NotImplemented      # not per output feature, or grouped: materialize
  kw = dict(dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **params)
  lora = rhs.lora()
  c = rhs.column_scale()
  ndim = rhs.ndim

  def effective(x):
    y = conv_lib._conv(primitive, x, lora, **kw)  # pylint: disable=protected-access
    return (y * _place(c, [out_spec[1]], ndim).astype(y.dtype)).astype(y.dtype)

  def dense(x):
    return lax.conv_general_dilated(x, lax.stop_gradient(rhs.w), **kw)

  return _with_dropout(lhs, dense, effective)


@registry.primitive_handler("gather")
def _gather(primitive, weight, indices, *, dimension_numbers, slice_sizes, **params):
  """``W'[ids]``: the LoRA lookup times the scales of the features it keeps."""
  if not isinstance(weight, DoraWeight) or implicit_array.is_implicit(indices):
    return NotImplemented
  stack, _, outs = weight.groups
  y = gather_lib._gather(primitive, weight.lora(), indices,  # pylint: disable=protected-access
                         dimension_numbers=dimension_numbers,
                         slice_sizes=slice_sizes, **params)
  if y is NotImplemented or stack:
    return NotImplemented
  dn = dimension_numbers
  axis = dn.collapsed_slice_dims[0]
  c = weight.column_scale()
  kept = [d for d in range(weight.ndim) if d != axis]     # offset axes, in order
  if axis not in outs:     # rows of the in group: the out axes are offset dims
    scale = _place(c, [dn.offset_dims[kept.index(d)] for d in outs], y.ndim)
  else:                    # along the (single) out axis: gather the scales too
    n_batch = y.ndim - len(dn.offset_dims)
    cg = lax.gather(c, indices, lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)), (1,),
        **params)
    batch_pos = [p for p in range(y.ndim) if p not in dn.offset_dims]
    scale = _place(cg, batch_pos[:n_batch], y.ndim)
  return (y * scale.astype(y.dtype)).astype(y.dtype)


@registry.primitive_handler(("ragged_dot_general", "ragged_dot"))
def _ragged_dot(primitive, lhs, rhs, *args, **params):
  del primitive, lhs, args, params
  if not isinstance(rhs, DoraWeight):
    return NotImplemented
  raise ValueError(
      f"DoRA on a per-expert kernel of shape {tuple(rhs.shape)} (ragged_dot, a "
      "mixture-of-experts layer): PEFT has no DoRA for these (its "
      "target_parameters LoRA refuses use_dora), so xrapture has none either. "
      "Set config.use_dora = False, or leave this kernel out of config.targets.")


@registry.primitive_handler("convert_element_type")
def _convert(primitive, weight, *, new_dtype, **unused_params):
  del primitive, unused_params
  if not isinstance(weight, DoraWeight) or not jnp.issubdtype(new_dtype, jnp.floating):
    return NotImplemented
  return weight.replace(**{k: getattr(weight, k).astype(new_dtype)
                           for k in ("w", "a", "b", "magnitude")})


@registry.primitive_handler("copy")
def _copy(primitive, weight, **unused_params):
  del primitive, unused_params
  return weight if isinstance(weight, DoraWeight) else NotImplemented


@registry.primitive_handler("transpose")
def _transpose(primitive, weight, *, permutation):
  """Permutes ``w`` and its layout; the magnitude follows its stacked and out axes."""
  if not isinstance(weight, DoraWeight):
    return NotImplemented
  lora = structural._transpose(primitive, weight.lora(), permutation=permutation)  # pylint: disable=protected-access
  perm = tuple(permutation)
  old_stack, _, old_outs = weight.groups
  new_stack, _, new_outs = lora_weight.groups(lora.layout)
  old = list(old_stack + old_outs)
  magnitude = jnp.transpose(weight.magnitude,
                            [old.index(perm[d]) for d in new_stack + new_outs])
  return dora.DoraWeight(lora.w, lora.a, lora.b, magnitude, alpha=weight.alpha,
                         rslora=weight.rslora, layout=lora.layout)
