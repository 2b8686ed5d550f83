"""LoraWeight: ``w + scale · b @ a`` held as its three factors.

The update is LoRA on the matrix the model contracts. A ``layout`` string
gives each axis of ``w`` a role: ``'s'`` stacked (an independent adapter per
index: scanned layers, experts), ``'i'`` the *in* group (the axes a matmul
contracts; for a conv, its window and input channels), ``'o'`` the *out*
group. Per stacked element the update is ``scale · b @ a`` on the grouped
matrix ``[prod(in), prod(out)]``, laid back into ``w``'s axis order.
"""

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import implicit_array

LORA_FREEZE = 0
LORA_FULL = -1

STACK, IN, OUT = "s", "i", "o"


def is_spec_leaf(x) -> bool:
  """A lora spec entry: a rank, ``LORA_FULL`` or ``LORA_FREEZE``."""
  return isinstance(x, (int, np.integer))


def default_layout(ndim: int) -> str:
  """0.1.0's layout: leading axes stacked, the last two ``'i'`` and ``'o'``."""
  return STACK * max(ndim - 2, 0) + IN + OUT


def groups(layout: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``(stacked, in, out)`` axes of ``w``, each in ``w``'s axis order."""
  axes = lambda g: tuple(d for d, c in enumerate(layout) if c == g)
  return axes(STACK), axes(IN), axes(OUT)


def factor_shapes(shape: tuple[int, ...], layout: str, rank: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(a shape, b shape)``: ``a [*S, r, *O]`` and ``b [*S, *I, r]``."""
  s, i, o = ([shape[d] for d in g] for g in groups(layout))
  return tuple(s + [rank] + o), tuple(s + i + [rank])


def grouped_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
  """``(prod(in), prod(out))``: the matrix each stacked element adapts."""
  _, i, o = groups(layout)
  return (math.prod(shape[d] for d in i), math.prod(shape[d] for d in o))


class Layered(Protocol):
  """What :func:`layout_of` reads: LoraWeight, DoraWeight and MixedLoraWeight have it."""

  @property
  def w(self) -> jax.Array: ...

  @property
  def layout(self) -> str | None: ...


def layout_of(lora: Layered) -> str:
  """``lora``'s layout for its current ``w``.

  Inside ``jax.vmap`` or a ``lax.scan`` over a stack of LoraWeights, the
  leaves lose their leading (stacked) axes while the static layout keeps
  them; those leading ``'s'`` are dropped here (and added back for leaves
  that gained leading axes).
  """
  stored, nd = lora.layout, len(lora.w.shape)
  if stored is None:
    return default_layout(nd)
  extra = len(stored) - nd
  if extra == 0:
    return stored
  if extra > 0 and set(stored[:extra]) == {STACK}:
    return stored[extra:]
  if extra < 0:
    return STACK * -extra + stored
  raise ValueError(f"LoraWeight of shape {tuple(lora.w.shape)} has layout "
                   f"{stored!r}, whose leading axes are not stacked ('s').")


def _apply(x: Any, fn) -> Any:
  """``fn(x)``, or its abstract value for a ``jax.ShapeDtypeStruct``."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.eval_shape(fn, x)
  return fn(x)


def _from_v010(w, a, b) -> tuple[str | None, str | None]:
  """0.1.0's form ``a [..., r, N]``, ``b [..., M, r]`` -> ``(layout, problem)``.

  A leading axis where ``b`` is full and ``a`` has size 1 joins the in group
  (a conv window spanned by ``b``), where ``a`` is full and ``b`` has size 1
  the out group; one where both are full (or both 1: broadcast) is stacked.
  """
  nd = len(w)
  if b[-2] != w[-2]:
    return None, f"b.shape[-2] must equal w.shape[-2] = {w[-2]} (M)"
  if a[-1] != w[-1]:
    return None, f"a.shape[-1] must equal w.shape[-1] = {w[-1]} (N)"
  if a[-2] != b[-1]:
    return None, f"the rank must agree: a.shape[-2] = {a[-2]}, b.shape[-1] = {b[-1]}"
  chars = []
  for d in range(nd - 2):
    if a[d] not in (1, w[d]) or b[d] not in (1, w[d]):
      return None, f"leading axes of a and b must each be 1 or equal w's {w[:-2]}"
    if a[d] == b[d]:
      chars.append(STACK)
    elif b[d] == w[d]:
      chars.append(IN)
    else:
      chars.append(OUT)
  return "".join(chars) + IN + OUT, None


def _normalize_v010(w_shape, layout, a, b):
  """Factors of 0.1.0's form rearranged into ``layout``'s ``a``/``b``."""
  nd = len(w_shape)
  s, i, o = groups(layout)
  a_lead = [d for d in range(nd - 2) if layout[d] in (STACK, OUT)]
  b_lead = [d for d in range(nd - 2) if layout[d] in (STACK, IN)]

  def fix_b(x):
    x = jnp.broadcast_to(x, tuple(w_shape[d] if layout[d] == STACK else x.shape[d]
                                  for d in range(nd - 2)) + x.shape[-2:])
    x = lax.squeeze(x, [d for d in range(nd - 2) if layout[d] == OUT])
    # Now [*b_lead in w order, M, r]: stacked axes first.
    order = [b_lead.index(d) for d in s] + [b_lead.index(d) for d in i if d < nd - 2]
    return jnp.transpose(x, order + [len(b_lead), len(b_lead) + 1])

  def fix_a(x):
    x = jnp.broadcast_to(x, tuple(w_shape[d] if layout[d] == STACK else x.shape[d]
                                  for d in range(nd - 2)) + x.shape[-2:])
    x = lax.squeeze(x, [d for d in range(nd - 2) if layout[d] == IN])
    # Now [*a_lead in w order, r, N]: stacked axes, then r, then out axes.
    order = ([a_lead.index(d) for d in s] + [len(a_lead)]
             + [a_lead.index(d) for d in o if d < nd - 2] + [len(a_lead) + 1])
    return jnp.transpose(x, order)

  return _apply(a, fix_a), _apply(b, fix_b)


def layout_problem(shape, layout) -> str | None:
  """What is wrong with ``layout`` for a kernel of ``shape``, or None."""
  if not isinstance(layout, str) or len(layout) != len(shape) or set(layout) - set("sio"):
    return (f"layout must be a string of {len(shape)} characters from 's', 'i', 'o' "
            f"(one per axis of w), got {layout!r}")
  if IN not in layout or OUT not in layout:
    return f"layout {layout!r} needs at least one 'i' and one 'o' axis"
  return None


class LoraWeight(implicit_array.ImplicitArray):
  """A kernel ``w`` plus a low-rank update ``scale · b @ a`` on its grouped matrix.

  ``layout`` has one character per axis of ``w``: ``'s'`` (stacked: one
  adapter per index), ``'i'`` (in group) or ``'o'`` (out group). With S, I, O
  the sizes of those axes in ``w``'s order, ``b`` is ``[*S, *I, r]`` and ``a``
  is ``[*S, r, *O]``; per stacked element the update is ``scale · b @ a`` as a
  ``[prod(I), prod(O)]`` matrix, laid back into ``w``'s axis order. The
  default ``layout=None`` is 0.1.0's: leading axes stacked, then ``'io'``, so
  ``w [M, N]``, ``a [r, N]``, ``b [M, r]``. 0.1.0's conv form (``a`` or ``b``
  with size-1 leading axes where ``w``'s are not 1) is accepted and
  rearranged: an axis only ``b`` spans joins the in group, one only ``a``
  spans the out group.

  ``scale`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``. The base
  ``w`` is frozen by construction: every handler stops its gradient.

  Attributes:
    w: the frozen base kernel.
    a: the ``[*S, r, *O]`` factor.
    b: the ``[*S, *I, r]`` factor.
    alpha: static LoRA alpha.
    rslora: static; scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
    layout: static; one of ``'s'``, ``'i'``, ``'o'`` per axis of ``w``.
    residual: static; ``w`` is not the pretrained kernel but what remains of
      it after the initialization moved its top part into the adapter
      (PiSSA: ``w = W - s·b₀@a₀``), so the factors fit this ``w`` only.
      :func:`xrapture.save_adapter` records it, and
      :func:`xrapture.load_adapter` refuses such an adapter on another kernel.

  Examples:
    >>> import jax.numpy as jnp, xrapture
    >>> lora = xrapture.LoraWeight(
    ...     jnp.zeros((3, 2)), a=jnp.ones((1, 2)), b=jnp.ones((3, 1)), alpha=2.0)
    >>> lora.shape, lora.rank, lora.get_scale()
    ((3, 2), 1, 2.0)
    >>> print(lora.materialize())
    [[2. 2.]
     [2. 2.]
     [2. 2.]]
    >>> matmul = xrapture.implicit.use_implicit_args(lambda x, w: x @ w)
    >>> print(matmul(jnp.ones((1, 3)), lora))  # x @ w + 2 · (x @ b) @ a
    [[6. 6.]]
  """

  w: jax.Array
  a: jax.Array
  b: jax.Array
  alpha: float = implicit_array.aux_field(default=1.0)
  rslora: bool = implicit_array.aux_field(default=False)
  layout: str | None = implicit_array.aux_field(default=None)
  residual: bool = implicit_array.aux_field(default=False)

  def __post_init__(self):
    shapes = [getattr(x, "shape", None) for x in (self.w, self.a, self.b)]
    if any(s is None for s in shapes):
      return
    w, a, b = (tuple(s) for s in shapes)
    layout = self.layout
    problem = None
    if layout is None:
      if len(w) < 2:
        problem = "w must have at least 2 dimensions"
      elif len(a) != len(w) or len(b) != len(w):
        problem = ("w, a and b must have the same number of dimensions (or pass "
                   "layout=...)")
      else:
        layout, problem = _from_v010(w, a, b)
        if problem is None:
          if layout != default_layout(len(w)) or a[:-2] != b[:-2] or a[:-2] != w[:-2]:
            new_a, new_b = _normalize_v010(w, layout, self.a, self.b)
            object.__setattr__(self, "a", new_a)
            object.__setattr__(self, "b", new_b)
          object.__setattr__(self, "layout", layout)
      if problem:
        raise ValueError(
            f"LoraWeight shapes disagree: w {w}, a {a}, b {b}; expected "
            f"w [..., M, N], a [..., r, N], b [..., M, r]: {problem}.")
      return
    problem = layout_problem(w, layout)
    if problem is None:
      r = b[-1] if b else None
      want_a, want_b = factor_shapes(w, layout, r)
      if len(b) < 1 or (a, b) != (want_a, want_b):
        problem = (f"for layout {layout!r} expected a {want_a} and b {want_b} "
                   f"(r = b.shape[-1] = {r})")
    if problem:
      raise ValueError(
          f"LoraWeight shapes disagree: w {w}, a {a}, b {b}, layout {layout!r}; "
          f"expected a [*S, r, *O] and b [*S, *I, r]: {problem}.")

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
  def groups(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stacked, in, out)`` axes of ``w``, each in ``w``'s axis order."""
    return groups(layout_of(self))

  @property
  def grouped_shape(self) -> tuple[int, int]:
    """``(prod(in), prod(out))``: the matrix each stacked element adapts."""
    return grouped_shape(self.shape, layout_of(self))

  def scannable(self, length: int) -> bool:
    """Whether a scan can slice it: its leading axis is stacked, of ``length``."""
    return self.ndim >= 1 and self.shape[0] == length and layout_of(self)[0] == STACK

  def get_scale(self) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rslora), ``r = b.shape[-1]``."""
    r = self.b.shape[-1]
    return self.alpha / (math.sqrt(r) if self.rslora else r)

  def delta(self) -> jax.Array:
    """The update ``scale · b @ a`` in ``w``'s shape (forms the dense array)."""
    s, i, o = self.groups
    shape = self.shape
    s_shape = tuple(shape[d] for d in s)
    m, n = self.grouped_shape
    r = self.rank
    b = self.b.reshape(s_shape + (m, r))
    a = self.a.reshape(s_shape + (r, n))
    delta = self.get_scale() * jnp.matmul(b, a)
    delta = delta.reshape(s_shape + tuple(shape[d] for d in i + o))
    return jnp.transpose(delta, tuple(np.argsort(s + i + o)))

  def materialize(self) -> jax.Array:
    """``w + scale · b @ a`` in ``w``'s dtype (``w``'s gradient stopped).

    An implicit ``w`` (a quantized kernel) is materialized first.
    """
    w = implicit_array.materialize_nested(self.w)
    return (lax.stop_gradient(w) + self.delta()).astype(w.dtype)

  def with_layout(self, layout: str) -> "LoraWeight":
    """The same value with size-1 axes of ``w`` moved to other groups.

    An axis of size 1 adds nothing to any group, so only the factors' shapes
    change (a 1x1 conv window given as stacked becomes part of the in group).

    Raises:
      ValueError: ``layout`` moves an axis of size greater than 1.
    """
    current = layout_of(self)
    moved = [d for d, (c, n) in enumerate(zip(current, layout)) if c != n]
    if len(layout) != len(current) or any(self.shape[d] != 1 for d in moved):
      raise ValueError(f"with_layout can only move axes of size 1: {current!r} -> "
                       f"{layout!r} for w {self.shape}")
    a_shape, b_shape = factor_shapes(self.shape, layout, self.rank)
    return dataclasses.replace(self, a=_apply(self.a, lambda x: x.reshape(a_shape)),
                               b=_apply(self.b, lambda x: x.reshape(b_shape)),
                               layout=layout)

  def replace(self, **changes) -> "LoraWeight":
    """A validated copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)
