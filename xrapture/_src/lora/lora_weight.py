"""LoraWeight: ``w + scale · b @ a`` held as its three factors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import implicit_array

LORA_FREEZE = 0
LORA_FULL = -1


def is_spec_leaf(x) -> bool:
  """A lora spec entry: a rank, ``LORA_FULL`` or ``LORA_FREEZE``."""
  return isinstance(x, (int, np.integer))


def _broadcasts_to(lead: tuple[int, ...], target: tuple[int, ...]) -> bool:
  return len(lead) == len(target) and all(d in (1, t) for d, t in zip(lead, target))


class LoraWeight(implicit_array.ImplicitArray):
  """A kernel ``w [..., M, N]`` plus a low-rank update ``scale · b @ a``.

  ``a`` is ``[..., r, N]`` and ``b`` is ``[..., M, r]``. Leading axes are
  either stacked layers (same sizes as ``w``'s, as from ``hk.layer_stack``)
  or size 1 (broadcast, as for a conv kernel's window in the factor that is
  applied pointwise). ``scale`` is ``alpha / r``, or ``alpha / sqrt(r)`` with
  ``rslora``. The base ``w`` is frozen by construction: every handler stops
  its gradient, so no ``M×N`` gradient is ever computed.

  Attributes:
    w: the frozen base kernel.
    a: the ``[..., r, N]`` factor.
    b: the ``[..., M, r]`` factor.
    alpha: static LoRA alpha.
    rslora: static; scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).

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

  def __post_init__(self):
    shapes = [getattr(x, "shape", None) for x in (self.w, self.a, self.b)]
    if any(s is None for s in shapes):
      return
    w, a, b = (tuple(s) for s in shapes)
    problem = None
    if len(w) < 2:
      problem = "w must have at least 2 dimensions"
    elif len(a) != len(w) or len(b) != len(w):
      problem = "w, a and b must have the same number of dimensions"
    elif b[-2] != w[-2]:
      problem = f"b.shape[-2] must equal w.shape[-2] = {w[-2]} (M)"
    elif a[-1] != w[-1]:
      problem = f"a.shape[-1] must equal w.shape[-1] = {w[-1]} (N)"
    elif a[-2] != b[-1]:
      problem = f"the rank must agree: a.shape[-2] = {a[-2]}, b.shape[-1] = {b[-1]}"
    elif not (_broadcasts_to(a[:-2], w[:-2]) and _broadcasts_to(b[:-2], w[:-2])):
      problem = (f"leading axes of a and b must each be 1 or equal w's {w[:-2]}")
    if problem:
      raise ValueError(
          f"LoraWeight shapes disagree: w {w}, a {a}, b {b}; expected "
          f"w [..., M, N], a [..., r, N], b [..., M, r]: {problem}.")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def rank(self) -> int:
    return self.b.shape[-1]

  def get_scale(self) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rslora), ``r = b.shape[-1]``."""
    r = self.b.shape[-1]
    return self.alpha / (math.sqrt(r) if self.rslora else r)

  def materialize(self) -> jax.Array:
    """``w + scale · b @ a`` in ``w``'s dtype (``w``'s gradient stopped)."""
    delta = self.get_scale() * jnp.matmul(self.b, self.a)
    return (lax.stop_gradient(self.w) + delta).astype(self.w.dtype)

  def replace(self, **changes) -> "LoraWeight":
    """A validated copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)
