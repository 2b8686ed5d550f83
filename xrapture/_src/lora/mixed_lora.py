"""MixedLoraWeight: one kernel, several adapters, each example of a batch its own.

PEFT's ``adapter_names=`` inference (S-LoRA / Punica style): a batch whose
example ``e`` runs ``w + b_k a_k`` for its own adapter ``k = ids[e]`` (or
the base alone for ``-1``). The adapters' factors are stacked along a slot
axis, their scales folded into ``b`` and their ranks zero-padded to the
largest, plus one all-zero slot for the base; a matmul gathers each
example's ``b`` and ``a`` (``r`` numbers per in and out feature) and runs
two batched matmuls through the rank. No per-example dense weight is formed.

The example axis is the leading axis of the activations (of the token ids
for an embedding lookup). Ids out of range are an error when they are
concrete; traced ids (inside ``jax.jit``) that are out of range give NaN
outputs for those examples rather than another adapter's.
"""

import math
import string

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import registry
from xrapture._src.lora import lora_weight

STACK, IN, OUT = lora_weight.STACK, lora_weight.IN, lora_weight.OUT


class MixedLoraWeight(implicit_array.ImplicitArray):
  """A base kernel with stacked adapters, one chosen per example by ``ids``.

  Attributes:
    w: the frozen base kernel.
    a: ``[*S, slots, r, *O]``; slot ``k < len(names)`` is adapter
      ``names[k]``, the last slot is zero (the base).
    b: ``[*S, slots, *I, r]``, each adapter's scale folded in.
    ids: ``[*S, batch]`` int32, each example's adapter (``-1``: the base),
      or None before :func:`xrapture.with_adapter_ids`.
    layout: static; as :class:`xrapture.LoraWeight`'s.
    names: static; the adapters' names, slot by slot.
  """

  w: jax.Array
  a: jax.Array
  b: jax.Array
  ids: jax.Array | None = None
  layout: str | None = implicit_array.aux_field(default=None)
  names: tuple[str, ...] = implicit_array.aux_field(default=())

  def __post_init__(self):
    if any(getattr(x, "shape", None) is None for x in (self.w, self.a, self.b)):
      return
    layout = lora_weight.layout_of(self)
    problem = lora_weight.layout_problem(tuple(self.w.shape), layout)
    slots = len(self.names) + 1
    if problem is None:
      stack, ins, outs = lora_weight.groups(layout)
      shape = tuple(self.w.shape)
      r = self.b.shape[-1]
      s = tuple(shape[d] for d in stack)
      want_a = s + (slots, r) + tuple(shape[d] for d in outs)
      want_b = s + (slots,) + tuple(shape[d] for d in ins) + (r,)
      if (tuple(self.a.shape), tuple(self.b.shape)) != (want_a, want_b):
        problem = f"expected a {want_a} and b {want_b} ({slots} slots, rank {r})"
      elif self.ids is not None and tuple(self.ids.shape[:-1]) != s:
        problem = f"ids must be [*S, batch] with S = {s}, got {tuple(self.ids.shape)}"
    if problem:
      raise ValueError(f"MixedLoraWeight shapes disagree: w {tuple(self.w.shape)}, a "
                       f"{tuple(self.a.shape)}, b {tuple(self.b.shape)}, layout "
                       f"{layout!r}: {problem}.")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def materialize(self):
    raise ValueError(
        f"A MixedLoraWeight of shape {self.shape} (adapters {list(self.names)}) has "
        "no single dense value: each example uses its own adapter. It runs through "
        "matmuls contracting the kernel's whole in (or out) group and embedding "
        "lookups, with the examples on the activations' leading axis; this use of "
        "the kernel is not one of them. Run such a model adapter by adapter "
        "(xrapture.adapter_params).")

  def slots(self, batch: int, where: str) -> tuple[jax.Array, jax.Array | None]:
    """Each example's slot ``[batch]`` and, for traced ids, its validity."""
    if self.ids is None:
      raise ValueError(
          f"The MixedLoraWeight of shape {self.shape} has no per-example adapter "
          "ids: pass the params through xrapture.with_adapter_ids(params, ids).")
    if self.ids.ndim != 1 or self.ids.shape[0] != batch:
      raise ValueError(
          f"{len(self.ids) if self.ids.ndim == 1 else self.ids.shape} adapter ids for "
          f"a batch of {batch} examples ({where}); per-example adapters need the "
          "examples on the leading axis of the activations, one id each.")
    n = len(self.names)
    ids = self.ids.astype(jnp.int32)
    slots = jnp.where(ids < 0, n, ids)
    if not compat.is_tracer(ids):
      bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
      if bad.size:
        raise ValueError(f"adapter ids {sorted(set(bad.tolist()))} out of range: "
                         f"valid are -1 (the base) to {n - 1} ({list(self.names)}).")
      return slots, None
    return slots, (ids >= -1) & (ids < n)


def _poison(y, valid, axis):
  """NaN for the examples whose traced id was out of range."""
  if valid is None:
    return y
  shape = [1] * y.ndim
  shape[axis] = valid.shape[0]
  return jnp.where(valid.reshape(shape), y, jnp.asarray(jnp.nan, y.dtype))


@registry.primitive_handler("dot_general")
def _dot_general(primitive, lhs, rhs, *, dimension_numbers, precision=None,
                 preferred_element_type=None, **params):
  del primitive, params
  w_lhs = isinstance(lhs, MixedLoraWeight)
  if not (w_lhs or isinstance(rhs, MixedLoraWeight)):
    return NotImplemented
  weight, x = (lhs, rhs) if w_lhs else (rhs, lhs)
  if implicit_array.is_implicit(x):
    return NotImplemented
  (lc, rc), (lb, rb) = dimension_numbers
  w_contract, x_contract = (lc, rc) if w_lhs else (rc, lc)
  stack, ins, outs = lora_weight.groups(lora_weight.layout_of(weight))
  if lb or rb or stack or set(w_contract) not in (set(ins), set(outs)) or 0 in x_contract:
    return NotImplemented
  slots, valid = weight.slots(x.shape[0], f"x of shape {tuple(x.shape)}")
  b = jnp.take(weight.b, slots, axis=0)          # [B, *I, r]
  a = jnp.take(weight.a, slots, axis=0)          # [B, r, *O]
  pool = iter(string.ascii_letters.replace("Z", "").replace("R", ""))
  w_l = [next(pool) for _ in range(weight.ndim)]
  x_l = ["Z"] + [w_l[w_contract[list(x_contract).index(d)]] if d in x_contract
                 else next(pool) for d in range(1, x.ndim)]
  x_free = [l for d, l in enumerate(x_l) if d not in x_contract]
  w_free = [w_l[d] for d in range(weight.ndim) if d not in w_contract]
  out = w_free + x_free if w_lhs else x_free + w_free
  b_l = ["Z"] + [w_l[d] for d in ins] + ["R"]
  a_l = ["Z", "R"] + [w_l[d] for d in outs]
  (f1, l1), (f2, l2) = (((b, b_l), (a, a_l)) if set(w_contract) == set(ins)
                        else ((a, a_l), (b, b_l)))
  subscripts = lambda *p: ",".join("".join(q) for q in p[:-1]) + "->" + "".join(p[-1])
  mid = x_free + ["R"]
  u = jnp.einsum(subscripts(x_l, l1, mid), x, f1, precision=precision)
  low = jnp.einsum(subscripts(mid, l2, out), u, f2, precision=precision,
                   preferred_element_type=preferred_element_type)
  w = lax.stop_gradient(weight.w)
  dense = lax.dot_general(w if w_lhs else x, x if w_lhs else w, dimension_numbers,
                          precision=precision,
                          preferred_element_type=preferred_element_type)
  return _poison(dense + low.astype(dense.dtype), valid, out.index("Z"))


@registry.primitive_handler("gather")
def _gather(primitive, weight, indices, *, dimension_numbers, slice_sizes, **params):
  """An embedding lookup: row ``tok`` of example ``e`` adds ``b_k[tok] @ a_k``."""
  del primitive
  if not isinstance(weight, MixedLoraWeight) or implicit_array.is_implicit(indices):
    return NotImplemented
  dn = dimension_numbers
  stack, ins, outs = lora_weight.groups(lora_weight.layout_of(weight))
  if (getattr(dn, "operand_batching_dims", ()) or stack or weight.ndim != 2
      or tuple(dn.collapsed_slice_dims) != ins or tuple(dn.start_index_map) != ins
      or slice_sizes[ins[0]] != 1 or slice_sizes[outs[0]] != weight.shape[outs[0]]
      or indices.ndim < 2):
    return NotImplemented
  dense = lax.gather(lax.stop_gradient(weight.w), indices, dn, slice_sizes, **params)
  n_batch = dense.ndim - len(dn.offset_dims)
  if n_batch < 1 or dn.offset_dims[0] == 0:
    return NotImplemented
  slots, valid = weight.slots(indices.shape[0], f"token ids of shape {tuple(indices.shape)}")
  r = weight.b.shape[-1]
  # (slot, token) pairs index b [slots, V, r]: r numbers per token.
  slot_ids = jnp.broadcast_to(slots.reshape((-1,) + (1,) * (indices.ndim - 1)),
                              indices.shape[:-1] + (1,)).astype(indices.dtype)
  pairs = jnp.concatenate([slot_ids, indices], axis=-1)
  g = lax.gather(weight.b, pairs, lax.GatherDimensionNumbers(
      offset_dims=(n_batch,), collapsed_slice_dims=(0, 1), start_index_map=(0, 1)),
      (1, 1, r), **params)                                       # [*batch, r]
  a = jnp.take(weight.a, slots, axis=0)                          # [B, r, D]
  low = jnp.einsum("z...r,zrd->z...d", g, a)
  low = jnp.moveaxis(low, tuple(range(n_batch, low.ndim)), tuple(dn.offset_dims))
  return _poison(dense + low.astype(dense.dtype), valid, 0)


@registry.primitive_handler("transpose")
def _transpose(primitive, weight, *, permutation):
  """``w.T`` (a tied unembedding): the factors keep their axes, regrouped."""
  del primitive
  if not isinstance(weight, MixedLoraWeight):
    return NotImplemented
  layout = lora_weight.layout_of(weight)
  if STACK in layout:
    return NotImplemented
  perm = tuple(permutation)
  new_layout = "".join(layout[p] for p in perm)
  _, ins, outs = lora_weight.groups(layout)
  _, new_ins, new_outs = lora_weight.groups(new_layout)
  b_perm = [0] + [1 + ins.index(perm[d]) for d in new_ins] + [len(ins) + 1]
  a_perm = [0, 1] + [2 + outs.index(perm[d]) for d in new_outs]
  return MixedLoraWeight(jnp.transpose(weight.w, perm), jnp.transpose(weight.a, a_perm),
                         jnp.transpose(weight.b, b_perm), weight.ids,
                         layout=new_layout, names=weight.names)


@registry.primitive_handler("convert_element_type")
def _convert(primitive, weight, *, new_dtype, **unused_params):
  del primitive, unused_params
  if (not isinstance(weight, MixedLoraWeight)
      or not jnp.issubdtype(new_dtype, jnp.floating)):
    return NotImplemented
  return MixedLoraWeight(weight.w.astype(new_dtype), weight.a.astype(new_dtype),
                         weight.b.astype(new_dtype), weight.ids, layout=weight.layout,
                         names=weight.names)


def stacked_factors(loras, layout: str, shape) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` of a MixedLoraWeight from one LoraWeight (or None) per slot.

  Scales go into ``b``, ranks are zero-padded to the largest, and a zero
  slot (the base) is appended.
  """
  stack, ins, outs = lora_weight.groups(layout)
  r = max([l.rank for l in loras if l is not None] + [1])
  s = tuple(shape[d] for d in stack)
  dtype = jnp.result_type(*[x for l in loras if l is not None for x in (l.a, l.b)])
  a_shape = s + (r,) + tuple(shape[d] for d in outs)
  b_shape = s + tuple(shape[d] for d in ins) + (r,)
  a_parts, b_parts = [], []
  for lora in list(loras) + [None]:
    if lora is None:
      a_parts.append(jnp.zeros(a_shape, dtype))
      b_parts.append(jnp.zeros(b_shape, dtype))
      continue
    pad = r - lora.rank
    a_pad = [(0, 0)] * lora.a.ndim
    a_pad[len(s)] = (0, pad)
    b_pad = [(0, 0)] * lora.b.ndim
    b_pad[-1] = (0, pad)
    a_parts.append(jnp.pad(lora.a.astype(dtype), a_pad))
    b_parts.append(jnp.pad((lora.b * lora.get_scale()).astype(dtype), b_pad))
  axis = len(s)
  return jnp.stack(a_parts, axis), jnp.stack(b_parts, axis)


def broadcast_ids(weight: MixedLoraWeight, ids: jax.Array) -> MixedLoraWeight:
  """``weight`` with ``ids [batch]`` copied for each stacked element."""
  stack, _, _ = lora_weight.groups(lora_weight.layout_of(weight))
  s = tuple(weight.shape[d] for d in stack)
  ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), s + (math.prod(ids.shape),))
  return MixedLoraWeight(weight.w, weight.a, weight.b, ids, layout=weight.layout,
                         names=weight.names)
