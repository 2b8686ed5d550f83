"""DoraWeight: DoRA, a learned magnitude times the column-normalized LoRA kernel.

DoRA (Liu et al. 2024, as HuggingFace PEFT implements it) computes with

  ``W' = m / ‖w + s·b@a‖_c · (w + s·b@a)``

where ``‖·‖_c`` is the norm of each output feature's column, taken over the
in group (for a conv kernel: its window and input channels; for an
embedding table: the vocabulary), ``m`` a trainable magnitude per output
feature, and the norm is treated as a constant (no gradient flows through
it: PEFT detaches it, as the paper's section 4.3 suggests).

The norm never needs ``b @ a``: per output column ``j``,
``‖w_j + s·b a_j‖² = ‖w_j‖² + 2s·a_jᵀ(bᵀw)_j + s²·a_jᵀ(bᵀb)a_j``, from the
``[r, out]`` product ``bᵀw`` and the ``r×r`` Gram matrix ``bᵀb``.
"""

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight
_HIGHEST = lax.Precision.HIGHEST


def _letters(layout: str) -> tuple[str, str, str, str]:
  """Einsum letters: ``(w, stacked, in, out)``, each in ``w``'s axis order."""
  w = string.ascii_lowercase[:len(layout)]
  pick = lambda role: "".join(l for l, c in zip(w, layout) if c == role)
  return w, pick(lora_weight.STACK), pick(lora_weight.IN), pick(lora_weight.OUT)


def column_norm(w, a, b, scale: float, layout: str) -> jax.Array:
  """``‖w + scale·b@a‖`` per output feature, ``[*S, *O]``, without ``b @ a``.

  Computed in float32 (or wider) with the highest matmul precision; the
  result is not detached (callers stop its gradient).
  """
  dtype = jnp.promote_types(jnp.result_type(w, a, b), jnp.float32)
  w, a, b = (x.astype(dtype) for x in (w, a, b))
  wl, sl, il, ol = _letters(layout)
  stack, ins, outs = lora_weight.groups(layout)
  # ‖w_j‖²: a reduction, laid out [*S, *O].
  sq = jnp.sum(jnp.square(w), axis=ins)
  kept = [d for d in range(len(layout)) if d not in ins]
  sq = jnp.transpose(sq, [kept.index(d) for d in stack + outs])
  btw = jnp.einsum(f"{sl}{il}R,{wl}->{sl}R{ol}", b, w, precision=_HIGHEST)
  cross = jnp.sum(a * btw, axis=len(stack))
  gram = jnp.einsum(f"{sl}{il}R,{sl}{il}Q->{sl}RQ", b, b, precision=_HIGHEST)
  ga = jnp.einsum(f"{sl}RQ,{sl}Q{ol}->{sl}R{ol}", gram, a, precision=_HIGHEST)
  quad = jnp.sum(a * ga, axis=len(stack))
  squared = sq + 2.0 * scale * cross + scale * scale * quad
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def to_w_axes(c: jax.Array, layout: str) -> jax.Array:
  """``c [*S, *O]`` laid out over ``w``'s axes, size 1 on the in axes."""
  stack, ins, outs = lora_weight.groups(layout)
  order = stack + outs
  c = jnp.transpose(c, tuple(np.argsort(order)))      # now in w's axis order
  shape = list(c.shape)
  for d in ins:
    shape.insert(d, 1)
  return c.reshape(shape)


class DoraWeight(implicit_array.ImplicitArray):
  """A LoRA kernel ``w + s·b@a`` whose output features are renormalized to ``magnitude``.

  Stands for ``magnitude / stop_gradient(‖w + s·b@a‖_c) · (w + s·b@a)``,
  the norm per output feature over the in group, per stacked element. The
  layout, ``a``, ``b``, ``alpha`` and ``rslora`` are as for
  :class:`xrapture.LoraWeight`; ``magnitude`` is ``[*S, *O]`` (stacked,
  then out axes, each in ``w``'s order). ``w`` is frozen; ``a``, ``b`` and
  ``magnitude`` train.

  Attributes:
    w: the frozen base kernel.
    a: the ``[*S, r, *O]`` factor.
    b: the ``[*S, *I, r]`` factor.
    magnitude: the ``[*S, *O]`` learned column norms.
    alpha: static LoRA alpha.
    rslora: static; scale by ``alpha / sqrt(r)``.
    layout: static; one of ``'s'``, ``'i'``, ``'o'`` per axis of ``w``.
    residual: static; ``w`` is a residual the factors alone fit (PiSSA), as
      for :class:`xrapture.LoraWeight`.
  """

  w: jax.Array
  a: jax.Array
  b: jax.Array
  magnitude: jax.Array
  alpha: float = implicit_array.aux_field(default=1.0)
  rslora: bool = implicit_array.aux_field(default=False)
  layout: str | None = implicit_array.aux_field(default=None)
  residual: bool = implicit_array.aux_field(default=False)

  def __post_init__(self):
    if any(getattr(x, "shape", None) is None
           for x in (self.w, self.a, self.b, self.magnitude)):
      return
    lora = LoraWeight(self.w, self.a, self.b, alpha=self.alpha, rslora=self.rslora,
                      layout=self.layout)
    for name in ("a", "b", "layout"):
      object.__setattr__(self, name, getattr(lora, name))
    stack, _, outs = lora.groups
    want = tuple(self.w.shape[d] for d in stack + outs)
    if tuple(self.magnitude.shape) != want:
      raise ValueError(
          f"DoraWeight magnitude has shape {tuple(self.magnitude.shape)}; for w "
          f"{tuple(self.w.shape)} with layout {lora.layout!r} it must be {want} "
          "(stacked axes, then out axes: one norm per output feature).")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def rank(self) -> int:
    return self.b.shape[-1]

  @property
  def groups(self):
    """``(stacked, in, out)`` axes of ``w``, each in ``w``'s axis order."""
    return lora_weight.groups(lora_weight.layout_of(self))

  @property
  def grouped_shape(self) -> tuple[int, int]:
    """``(prod(in), prod(out))``: the matrix each stacked element adapts."""
    return lora_weight.grouped_shape(self.shape, lora_weight.layout_of(self))

  def get_scale(self) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rslora)."""
    r = self.rank
    return self.alpha / (math.sqrt(r) if self.rslora else r)

  def lora(self) -> LoraWeight:
    """The LoRA kernel ``w + s·b@a`` this weight renormalizes."""
    return LoraWeight(self.w, self.a, self.b, alpha=self.alpha, rslora=self.rslora,
                      layout=lora_weight.layout_of(self), residual=self.residual)

  def weight_norm(self) -> jax.Array:
    """``‖w + s·b@a‖`` per output feature, ``[*S, *O]``, gradient stopped."""
    return lax.stop_gradient(column_norm(
        self.w, self.a, self.b, self.get_scale(), lora_weight.layout_of(self)))

  def column_scale(self) -> jax.Array:
    """``magnitude / weight_norm()``, ``[*S, *O]``: what multiplies each column."""
    norm = self.weight_norm()
    return self.magnitude.astype(norm.dtype) / norm

  def materialize(self) -> jax.Array:
    """The merged DoRA kernel, in ``w``'s dtype (as PEFT's merge: the norm
    from the dense ``w + s·b@a``, detached)."""
    layout = lora_weight.layout_of(self)
    _, ins, _ = lora_weight.groups(layout)
    dense = lax.stop_gradient(self.w) + self.lora().delta()
    norm = lax.stop_gradient(jnp.sqrt(jnp.sum(
        jnp.square(dense.astype(jnp.promote_types(dense.dtype, jnp.float32))),
        axis=ins, keepdims=True)))
    m = to_w_axes(self.magnitude, layout)
    return (m / norm * dense).astype(self.w.dtype)

  def replace(self, **changes) -> "DoraWeight":
    """A validated copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)


def from_lora(lora: LoraWeight, magnitude: jax.Array | None = None) -> DoraWeight:
  """``lora`` as a DoraWeight; the magnitude defaults to its column norms.

  With the default magnitude the DoraWeight computes exactly what ``lora``
  does (PEFT's initialization: ``m = ‖w + s·b@a‖_c``, which is ``‖w‖_c``
  while ``b = 0``).
  """
  layout = lora_weight.layout_of(lora)
  if magnitude is None:
    magnitude = column_norm(lora.w, lora.a, lora.b, lora.get_scale(), layout)
    magnitude = magnitude.astype(lora.a.dtype)
  return DoraWeight(lora.w, lora.a, lora.b, magnitude, alpha=lora.alpha,
                    rslora=lora.rslora, layout=layout, residual=lora.residual)


def is_adapter(x) -> bool:
  """A LoraWeight or DoraWeight: an implicit kernel with trainable factors."""
  return isinstance(x, (LoraWeight, DoraWeight))
