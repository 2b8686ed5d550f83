"""Primitives that re-lay out, cast, index or scale a LoraWeight and keep it low-rank.

Each returns new LoraWeight(s), so the matmul that follows stays low-rank.
Every axis of ``w`` lives in ``b`` (stacked and in axes), in ``a`` (stacked
and out axes) or in both (stacked), so an op on one axis of ``w`` is the
same op on that axis of the factors that hold it:

* ``transpose`` permutes ``w`` and the layout (and the factors' axes where
  the permutation reorders axes of one group);
* ``slice``, ``dynamic_slice``, ``split`` along an out axis cut ``w`` and
  ``a`` and keep ``b``; along an in axis ``w`` and ``b``; along a stacked
  axis all three;
* ``squeeze``, ``expand_dims`` (``broadcast_in_dim`` adding size-1 axes) and
  a ``reshape`` that merges or splits axes within one group reshape the
  factors;
* ``concatenate`` of LoraWeights along a stacked axis concatenates all three;
  along an in or out axis it stacks the adapters block-wise (the ranks add);
  ``stack`` adds a stacked axis;
* ``convert_element_type`` (``hk.mixed_precision``), ``copy``, ``device_put``,
  ``optimization_barrier`` pass through; multiplication or division by a constant scalar and
  negation scale ``w`` and ``b``.

Anything else returns ``NotImplemented``. Each op reaches ``w`` through
:func:`interpreter.call`, so an implicit (quantized) ``w`` is handled by its
own handlers (and materialized, with a warning, where it has none).
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight
STACK, IN, OUT = lora_weight.STACK, lora_weight.IN, lora_weight.OUT


def _new(lora, w, a, b, layout=None, **changes):
  kwargs = dict(alpha=lora.alpha, rslora=lora.rslora,
                layout=lora_weight.layout_of(lora) if layout is None else layout)
  kwargs.update(changes)
  return LoraWeight(w, a, b, **kwargs)


def _factor_axes(layout):
  """For each axis of ``w``, its axis in ``b`` and in ``a`` (None if absent)."""
  stack, ins, outs = lora_weight.groups(layout)
  in_b = {d: k for k, d in enumerate(stack + ins)}
  in_a = {d: k for k, d in enumerate(stack)}
  in_a.update({d: len(stack) + 1 + k for k, d in enumerate(outs)})
  return ([in_b.get(d) for d in range(len(layout))],
          [in_a.get(d) for d in range(len(layout))])


def _per_axis(lora, values, fill):
  """``values`` (one per axis of ``w``) laid out per factor axis: (for a, for b).

  A factor axis with no ``w`` counterpart (the rank) gets ``fill(factor, k)``.
  """
  b_of, a_of = _factor_axes(lora_weight.layout_of(lora))
  out = []
  for factor, where in ((lora.a, a_of), (lora.b, b_of)):
    per = [None] * factor.ndim
    for d, k in enumerate(where):
      if k is not None:
        per[k] = values[d]
    out.append([fill(factor, k) if v is None else v for k, v in enumerate(per)])
  return out


def _regroup(lora, w, layout):
  """``lora`` with ``w`` replaced by a reshape of it whose groups are ``layout``."""
  if lora_weight.layout_problem(w.shape, layout):
    return NotImplemented
  a_shape, b_shape = lora_weight.factor_shapes(tuple(w.shape), layout, lora.rank)
  return _new(lora, w, lora.a.reshape(a_shape), lora.b.reshape(b_shape), layout)


@registry.primitive_handler("transpose")
def _transpose(primitive, lora, *, permutation):
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  perm = tuple(permutation)
  layout = lora_weight.layout_of(lora)
  new_layout = "".join(layout[p] for p in perm)
  b_of, a_of = _factor_axes(layout)
  stack, ins, outs = lora_weight.groups(new_layout)
  # The factors' axes in the new w's order, group by group.
  b_perm = [b_of[perm[d]] for d in stack + ins] + [lora.b.ndim - 1]
  a_perm = ([a_of[perm[d]] for d in stack] + [len(stack)]
            + [a_of[perm[d]] for d in outs])
  return _new(lora, interpreter.call(jnp.transpose, lora.w, perm),
              jnp.transpose(lora.a, a_perm),
              jnp.transpose(lora.b, b_perm), new_layout)


@registry.primitive_handler("convert_element_type")
def _convert(primitive, lora, *, new_dtype, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight) or not jnp.issubdtype(new_dtype, jnp.floating):
    return NotImplemented
  w = interpreter.call(lax.convert_element_type, lora.w, new_dtype)
  return _new(lora, w, *(x.astype(new_dtype) for x in (lora.a, lora.b)))


@registry.primitive_handler("copy")
def _copy(primitive, lora, **unused_params):
  del primitive, unused_params
  return lora if isinstance(lora, LoraWeight) else NotImplemented


@registry.primitive_handler("device_put")
def _device_put(primitive, *xs, devices, srcs, copy_semantics):
  """An identity in a traced program (``hk.nets.VectorQuantizer``'s codebook).

  A LoraWeight put on one device (or none named) puts each factor there; a
  sharding is laid out for ``w``'s shape, not the factors': materialized.
  """
  out = []
  for x, device, src, semantics in zip(xs, devices, srcs, copy_semantics):
    params = dict(devices=(device,), srcs=(src,), copy_semantics=(semantics,))
    if not isinstance(x, LoraWeight):
      out.extend(primitive.bind(x, **params))
    elif device is None or type(device).__name__.endswith("Device"):
      w = interpreter.call(primitive.bind, x.w, **params)[0]
      out.append(_new(x, w, *(primitive.bind(v, **params)[0] for v in (x.a, x.b))))
    else:
      return NotImplemented
  return out


@registry.primitive_handler("slice")
def _slice(primitive, lora, *, start_indices, limit_indices, strides=None):
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  strides = (1,) * lora.ndim if strides is None else tuple(strides)
  a_start, b_start = _per_axis(lora, list(start_indices), lambda f, k: 0)
  a_limit, b_limit = _per_axis(lora, list(limit_indices), lambda f, k: f.shape[k])
  a_stride, b_stride = _per_axis(lora, list(strides), lambda f, k: 1)
  return _new(lora, interpreter.call(lax.slice, lora.w, start_indices, limit_indices,
                                     strides),
              lax.slice(lora.a, a_start, a_limit, a_stride),
              lax.slice(lora.b, b_start, b_limit, b_stride))


@registry.primitive_handler("dynamic_slice")
def _dynamic_slice(primitive, lora, *starts, slice_sizes):
  del primitive
  if not isinstance(lora, LoraWeight) or any(
      implicit_array.is_implicit(s) for s in starts):
    return NotImplemented
  zero = jnp.zeros_like(starts[0])
  a_start, b_start = _per_axis(lora, list(starts), lambda f, k: zero)
  a_size, b_size = _per_axis(lora, list(slice_sizes), lambda f, k: f.shape[k])
  return _new(lora, interpreter.call(lax.dynamic_slice, lora.w, starts, slice_sizes),
              lax.dynamic_slice(lora.a, a_start, a_size),
              lax.dynamic_slice(lora.b, b_start, b_size))


@registry.primitive_handler("split")
def _split(primitive, lora, *, sizes, axis):
  """``jnp.split``: ``hk.GRU`` splits ``w_h`` into its gates."""
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  layout = lora_weight.layout_of(lora)
  b_of, a_of = _factor_axes(layout)
  cut = lambda x, k, start, stop: (
      x if k is None else lax.slice_in_dim(x, start, stop, axis=k))
  out, start = [], 0
  for size in sizes:
    stop = start + int(size)
    w = interpreter.call(lax.slice_in_dim, lora.w, start, stop, 1, axis)
    out.append(_new(lora, w, cut(lora.a, a_of[axis], start, stop),
                    cut(lora.b, b_of[axis], start, stop), layout))
    start = stop
  return out


@registry.primitive_handler("squeeze")
def _squeeze(primitive, lora, *, dimensions):
  del primitive
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  dims = {d % lora.ndim for d in dimensions}
  layout = lora_weight.layout_of(lora)
  new_layout = "".join(c for d, c in enumerate(layout) if d not in dims)
  return _regroup(lora, interpreter.call(lax.squeeze, lora.w, tuple(sorted(dims))),
                  new_layout)


@registry.primitive_handler("broadcast_in_dim")
def _expand_dims(primitive, lora, *dyn_shape, shape, broadcast_dimensions, **params):
  """``expand_dims`` / ``w[None]``: new size-1 axes only (no real broadcast)."""
  if not isinstance(lora, LoraWeight) or dyn_shape:
    return NotImplemented
  mapped = dict(zip(broadcast_dimensions, range(lora.ndim)))
  if any(shape[o] != lora.shape[d] for o, d in mapped.items()):
    return NotImplemented
  if any(shape[o] != 1 for o in range(len(shape)) if o not in mapped):
    return NotImplemented
  layout = lora_weight.layout_of(lora)
  chars, previous = [], None
  for o in range(len(shape)):
    if o in mapped:
      previous = layout[mapped[o]]
    # A new leading axis is stacked; another joins the group before it.
    chars.append(layout[mapped[o]] if o in mapped else (previous or STACK))
  w = interpreter.call(primitive.bind, lora.w, shape=shape,
                       broadcast_dimensions=broadcast_dimensions, **params)
  return _regroup(lora, w, "".join(chars))


def _reshape_layout(old, new, layout):
  """The layout after reshaping ``old`` to ``new``, or None if groups would mix.

  A reshape cuts both shapes into runs with equal products (boundaries where
  the cumulative products agree). Axes of size 1 come and go freely; every
  other old axis of one run must share a role, which the run's new axes take.
  """
  cum_old, cum_new = np.cumprod((1,) + old), np.cumprod((1,) + new)
  bounds = sorted(set(cum_old.tolist()) & set(cum_new.tolist()))
  run = lambda start: max(b for b in bounds if b <= start)
  roles: dict[int, set[str]] = {}
  for d, size in enumerate(old):
    if size != 1:
      roles.setdefault(run(cum_old[d]), set()).add(layout[d])
  if any(len(r) > 1 for r in roles.values()):
    return None
  chars: list[str] = []
  for k, size in enumerate(new):
    if size != 1:
      (role,) = roles[run(cum_new[k])]
      chars.append(role)
    else:  # A new size-1 axis joins the group before it; a leading one is stacked.
      chars.append(chars[-1] if chars else STACK)
  return "".join(chars)


@registry.primitive_handler("reshape")
def _reshape(primitive, lora, *dyn_shape, new_sizes, dimensions=None, **params):
  """A reshape that merges or splits axes within one group (or adds/drops 1s)."""
  if not isinstance(lora, LoraWeight) or dyn_shape or dimensions is not None:
    return NotImplemented
  if 0 in lora.shape:
    return NotImplemented
  layout = _reshape_layout(tuple(lora.shape), tuple(new_sizes),
                           lora_weight.layout_of(lora))
  if layout is None:
    return NotImplemented
  w = interpreter.call(primitive.bind, lora.w, new_sizes=tuple(new_sizes),
                       dimensions=None, **params)
  return _regroup(lora, w, layout)


@registry.primitive_handler("concatenate")
def _concatenate(primitive, *operands, dimension):
  """LoraWeights joined along one axis.

  Along a stacked axis (same rank, alpha and layout) all three parts are
  concatenated. Along an in (out) axis the adapters are stacked block-wise:
  ``b`` (``a``) is concatenated along that axis, the other factor along the
  rank, with zeros off the blocks; the rank is the sum of the ranks and
  each part's scale is folded into ``b``. A plain array among the operands
  is refused: folded into the frozen ``w`` it would lose its gradient.
  """
  del primitive
  if not all(isinstance(x, LoraWeight) for x in operands):
    return NotImplemented
  first = operands[0]
  layout = lora_weight.layout_of(first)
  if any(lora_weight.layout_of(x) != layout for x in operands):
    return NotImplemented
  w = interpreter.call(lax.concatenate, [x.w for x in operands], dimension)
  b_of, a_of = _factor_axes(layout)
  role = layout[dimension]
  if role == STACK:
    if len({(x.rank, x.alpha, x.rslora) for x in operands}) != 1:
      return NotImplemented
    return _new(first, w, lax.concatenate([x.a for x in operands], a_of[dimension]),
                lax.concatenate([x.b for x in operands], b_of[dimension]), layout)
  scaled_b = [x.b * jnp.asarray(x.get_scale(), x.b.dtype) for x in operands]
  dtype = jnp.result_type(*[x.a for x in operands], *scaled_b)
  ranks = [x.rank for x in operands]
  total = sum(ranks)
  rank_axis_a, rank_axis_b = len(lora_weight.groups(layout)[0]), first.b.ndim - 1
  # `cut` is the factor concatenated along the w axis, `joined` the other one.
  if role == OUT:
    cut_parts, cut_axis, cut_rank = [x.a for x in operands], a_of[dimension], rank_axis_a
    joined_parts, joined_rank = scaled_b, rank_axis_b
  else:
    cut_parts, cut_axis, cut_rank = scaled_b, b_of[dimension], rank_axis_b
    joined_parts, joined_rank = [x.a for x in operands], rank_axis_a
  blocks, offset = [], 0
  for part, r in zip(cut_parts, ranks):
    pad = [(0, 0, 0)] * part.ndim
    pad[cut_rank] = (offset, total - offset - r, 0)
    blocks.append(lax.pad(part.astype(dtype), jnp.zeros((), dtype), pad))
    offset += r
  cut = lax.concatenate(blocks, cut_axis)
  joined = lax.concatenate([x.astype(dtype) for x in joined_parts], joined_rank)
  a, b = (cut, joined) if role == OUT else (joined, cut)
  return _new(first, w, a, b, layout, alpha=float(total), rslora=False)


@registry.primitive_handler("stack")
def _stack(primitive, *operands, axis):
  """``jnp.stack`` of LoraWeights with one rank, alpha and layout: a new stacked axis."""
  del primitive
  if not all(isinstance(x, LoraWeight) for x in operands):
    return NotImplemented
  first = operands[0]
  layout = lora_weight.layout_of(first)
  if len({(x.rank, x.alpha, x.rslora, lora_weight.layout_of(x)) for x in operands}) != 1:
    return NotImplemented
  axis = axis % (first.ndim + 1)
  new_layout = layout[:axis] + STACK + layout[axis:]
  k = new_layout[:axis].count(STACK)
  return _new(first, interpreter.call(jnp.stack, [x.w for x in operands], axis),
              jnp.stack([x.a for x in operands], k),
              jnp.stack([x.b for x in operands], k), new_layout)


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
  return _new(lora, interpreter.call(jnp.multiply, lora.w, c), lora.a,
              lora.b * c.astype(lora.b.dtype))


@registry.primitive_handler("div")
def _div(primitive, lora, c, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight) or not _scalar(c):
    return NotImplemented
  c = jnp.asarray(c, lora.dtype)
  return _new(lora, interpreter.call(jnp.divide, lora.w, c), lora.a,
              lora.b / c.astype(lora.b.dtype))


@registry.primitive_handler("neg")
def _neg(primitive, lora, **unused_params):
  del primitive, unused_params
  if not isinstance(lora, LoraWeight):
    return NotImplemented
  return _new(lora, interpreter.call(jnp.negative, lora.w), lora.a, -lora.b)


@registry.primitive_handler("optimization_barrier")
def _optimization_barrier(primitive, *operands, **unused_params):
  """The barrier holds each LoraWeight's factors; LoraWeights come out."""
  del primitive, unused_params
  if any(implicit_array.is_implicit(x) and not isinstance(x, LoraWeight)
         for x in operands):
    return NotImplemented
  leaves, treedef = jax.tree_util.tree_flatten(list(operands))
  return jax.tree_util.tree_unflatten(treedef, lax.optimization_barrier(leaves))
