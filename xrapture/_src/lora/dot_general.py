"""dot_general with a LoraWeight operand, never forming ``b @ a``.

The common case (no batch axes, the kernel contracted over exactly its in
group or exactly its out group: every ``hk.Linear``, attention projection,
multi-axis einsum kernel and tied unembedding) reshapes the kernel to its
grouped matrix and the other operand's free axes into tokens, and runs
:func:`lora_matmul`, a ``jax.custom_vjp`` whose backward pass computes only
the input gradient and the two low-rank gradients; the base kernel gets no
gradient at all. Any other dimension numbers (batch axes such as per-expert
kernels, stacked kernels, contractions that cut across the groups), and LoRA
dropout, go through two einsums that contract the other operand with one
factor and then the other, with the base kernel's gradient stopped.

The base kernel may itself be implicit (a quantized kernel): every product
with it goes through :func:`interpreter.call`, so its own handlers compute it
(an implicit kernel that is not already the 2-D grouped matrix takes the
einsum path: it is never reshaped).
"""

import functools
import math
import string

import jax
import jax.numpy as jnp
from jax import lax

from xrapture._src.implicit import implicit_array
from xrapture._src.implicit import interpreter
from xrapture._src.implicit import registry
from xrapture._src.lora import dropout
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight


def _dot(x, y, x_axis, y_axis, precision=None, preferred_element_type=None):
  return lax.dot_general(x, y, (((x_axis,), (y_axis,)), ((), ())),
                         precision=precision,
                         preferred_element_type=preferred_element_type)


def _roles(a, b, w_axis):
  """(first, first_k, second, second_r): first meets x, second gives outputs.

  With ``W = w + s·b@a``: contracting W's axis 0 (M) multiplies x by ``b``
  then ``a``; contracting axis 1 (N) multiplies x by ``aᵀ`` then ``bᵀ``.
  """
  if w_axis == 0:
    return b, 0, a, 0
  return a, 1, b, 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def lora_matmul(x, w, a, b, w_axis, scale, precision, preferred_element_type):
  """``x [T, K]`` times the 2-D LoRA kernel, contracting the kernel's ``w_axis``."""
  y, _ = _lora_matmul_fwd(x, w, a, b, w_axis, scale, precision,
                          preferred_element_type)
  return y


def _lora_matmul_fwd(x, w, a, b, w_axis, scale, precision, preferred_element_type):
  first, first_k, second, second_r = _roles(a, b, w_axis)
  u = _dot(x, first, 1, first_k, precision)                      # [T, r]
  us = u * jnp.asarray(scale, u.dtype)
  dense = interpreter.call(_dot, x, w, 1, w_axis, precision, preferred_element_type)
  low = _dot(us, second, 1, second_r, precision, preferred_element_type)
  y = dense + low.astype(dense.dtype)
  return y, (x, w, a, b, us)


def _tokens_outer_t(small, big, precision):
  """``bigᵀ @ small`` (``[K, r]``) from ``big [T, K]`` and ``small [T, r]``.

  XLA:CPU computes this product about 4x faster rank-major, as
  ``(smallᵀ @ big)ᵀ``, but folds a plain transpose back into the dot; an
  optimization barrier keeps the fast form. Other platforms get the plain dot.
  """
  def rank_major(small, big):
    return lax.optimization_barrier(_dot(small, big, 0, 0, precision)).T

  def plain(small, big):
    return _dot(big, small, 0, 0, precision)
  return lax.platform_dependent(small, big, cpu=rank_major, default=plain)


def _lora_matmul_bwd(w_axis, scale, precision, preferred_element_type, res, g):
  del preferred_element_type
  x, w, a, b, us = res
  first, first_k, second, second_r = _roles(a, b, w_axis)
  g = g.astype(x.dtype) if g.dtype != x.dtype else g
  gu = _dot(g, second, 1, 1 - second_r, precision) * jnp.asarray(scale, g.dtype)
  dx = (interpreter.call(_dot, g, w, 1, 1 - w_axis, precision)
        + _dot(gu, first, 1, 1 - first_k, precision))
  if first_k == 0:                      # first is b [K, r]
    d_first = _tokens_outer_t(gu, x, precision)
  else:                                 # first is a [r, K]
    d_first = _dot(gu, x, 0, 0, precision)
  if second_r == 0:                     # second is a [r, out]
    d_second = _dot(us, g, 0, 0, precision)
  else:                                 # second is b [out, r]
    d_second = _tokens_outer_t(us, g, precision)
  da, db = (d_second, d_first) if w_axis == 0 else (d_first, d_second)
  return dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


@registry.primitive_handler("dot_general")
def _dot_general(primitive, lhs, rhs, *, dimension_numbers, precision=None,
                 preferred_element_type=None, **unused_params):
  del primitive, unused_params
  if isinstance(lhs, LoraWeight) and isinstance(rhs, LoraWeight):
    lhs = registry.materialize(
        lhs, "dot_general of two LoraWeights materializes the left one")
  lhs_lora = isinstance(lhs, LoraWeight)
  if not (lhs_lora or isinstance(rhs, LoraWeight)):
    return NotImplemented
  lora, x = (lhs, rhs) if lhs_lora else (rhs, lhs)
  if implicit_array.is_implicit(x):
    return NotImplemented
  if dropout.active():
    return _general(lora, x, lhs_lora, dimension_numbers, precision,
                    preferred_element_type, x_low=dropout.maybe_drop(x))
  (lc, rc), (lb, rb) = dimension_numbers
  w_contract, x_contract = (lc, rc) if lhs_lora else (rc, lc)
  w_batch = lb if lhs_lora else rb
  if not w_batch:
    out = _matmul_grouped(lora, x, tuple(w_contract), tuple(x_contract), lhs_lora,
                          precision, preferred_element_type)
    if out is not NotImplemented:
      return out
  return _general(lora, x, lhs_lora, dimension_numbers, precision,
                  preferred_element_type)


def _contiguous(axes):
  return list(axes) == list(range(axes[0], axes[0] + len(axes)))


def _matmul_grouped(lora, x, w_contract, x_contract, lhs_lora, precision, pet):
  """The fast path: ``w`` contracted over exactly its in (or out) group.

  With no stacked axes and each group contiguous, ``w`` is a 2-D matrix
  after a reshape (no copy), and :func:`lora_matmul` runs on it.
  """
  stack, ins, outs = lora.groups
  contracted = set(w_contract)
  if stack or contracted not in (set(ins), set(outs)):
    return NotImplemented
  if not (_contiguous(ins) and _contiguous(outs)):
    return NotImplemented
  shape = lora.shape
  in_size, out_size = lora.grouped_shape
  r = lora.rank
  in_first = ins[0] < outs[0]
  first, second = (ins, outs) if in_first else (outs, ins)
  w2_shape = (math.prod(shape[d] for d in first), math.prod(shape[d] for d in second))
  if implicit_array.is_implicit(lora.w):
    if tuple(lora.w.shape) != w2_shape:   # an implicit w is not reshaped
      return NotImplemented
    w2 = lora.w
  else:
    w2 = lora.w.reshape(w2_shape)
  b2 = lora.b.reshape(in_size, r)
  a2 = lora.a.reshape(r, out_size)
  if not in_first:       # w2 is [out, in]: its "b" is aᵀ and its "a" is bᵀ
    b2, a2 = a2.T, b2.T
  w_axis = 0 if contracted == set(first) else 1
  free = second if w_axis == 0 else first
  # x's contracted axes in w's axis order, after its free axes.
  pairs = dict(zip(w_contract, x_contract))
  x_axes = [pairs[d] for d in sorted(w_contract)]
  x_free = [d for d in range(x.ndim) if d not in x_contract]
  x_moved = jnp.transpose(x, x_free + x_axes)
  free_shape = x_moved.shape[:len(x_free)]
  x2 = x_moved.reshape((math.prod(free_shape), -1))
  y = lora_matmul(x2, w2, a2, b2, w_axis, float(lora.get_scale()), precision, pet)
  y = y.reshape(free_shape + tuple(shape[d] for d in free))
  if lhs_lora:           # dot_general puts lhs's free axes first
    n = len(free_shape)
    y = jnp.transpose(y, tuple(range(n, y.ndim)) + tuple(range(n)))
  return y


def _general(lora, x, lhs_lora, dimension_numbers, precision, pet, x_low=None):
  """Any dimension numbers: two einsums through the rank, never ``b @ a``.

  The other operand meets the factor whose group it contracts most first, so
  the intermediate holds neither a full in group and a full out group at
  once. ``x_low`` (default ``x``) feeds the low-rank path (LoRA dropout).
  """
  (lc, rc), (lb, rb) = dimension_numbers
  w_contract, x_contract = (lc, rc) if lhs_lora else (rc, lc)
  w_batch, x_batch = (lb, rb) if lhs_lora else (rb, lb)
  pool = iter(string.ascii_letters.replace("R", ""))
  w_letters = [next(pool) for _ in range(lora.ndim)]
  x_letters = []
  for d in range(x.ndim):
    if d in x_contract:
      x_letters.append(w_letters[w_contract[list(x_contract).index(d)]])
    elif d in x_batch:
      x_letters.append(w_letters[w_batch[list(x_batch).index(d)]])
    else:
      x_letters.append(next(pool))
  batch = [w_letters[d] for d in w_batch]
  w_free = [w_letters[d] for d in range(lora.ndim) if d not in w_contract and d not in w_batch]
  x_free = [x_letters[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch]
  out = batch + (w_free + x_free if lhs_lora else x_free + w_free)

  stack, ins, outs = lora.groups
  b_letters = [w_letters[d] for d in stack + ins] + ["R"]
  a_letters = [w_letters[d] for d in stack] + ["R"] + [w_letters[d] for d in outs]
  contracted_size = lambda group: math.prod(
      lora.shape[d] for d in group if d in w_contract)
  b = lora.b * jnp.asarray(lora.get_scale(), lora.b.dtype)
  if (contracted_size(ins) >= contracted_size(outs)
      or not any(d in w_contract for d in outs)):
    (f1, l1), (f2, l2) = (b, b_letters), (lora.a, a_letters)
  else:
    (f1, l1), (f2, l2) = (lora.a, a_letters), (b, b_letters)
  keep = set(out) | set(l2)
  mid = [l for l in dict.fromkeys(x_letters + l1) if l in keep]
  subscripts = lambda *parts: ",".join("".join(p) for p in parts[:-1]) + "->" + "".join(parts[-1])
  y = jnp.einsum(subscripts(x_letters, l1, mid), x if x_low is None else x_low, f1,
                 precision=precision)
  low = jnp.einsum(subscripts(mid, l2, out), y, f2, precision=precision,
                   preferred_element_type=pet)
  w = lax.stop_gradient(lora.w)
  dense = interpreter.call(lax.dot_general, w if lhs_lora else x,
                           x if lhs_lora else w, dimension_numbers,
                           precision=precision, preferred_element_type=pet)
  return dense + low.astype(dense.dtype)
