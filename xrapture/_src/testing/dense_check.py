"""Proves that a function never forms a dense weight-sized product.

An implicit weight is cheap only while nothing computes a weight-sized array
from it: neither ``b @ a`` in the forward pass nor a gradient for the frozen
base kernel in the backward pass. A LoraWeight's weight-sized shapes are its
grouped matrix ``(M, N) = (prod(in), prod(out))`` (in either orientation) and,
for a kernel with three or more non-stacked axes (multi-axis or conv), those
axes' sizes in any order. This module looks for products of such a shape in
two places:

* :func:`find_dense_products` walks ``jax.make_jaxpr(fn)(*args)``, recursing
  into every sub-jaxpr (jit, remat, scan, while, cond, custom_jvp/custom_vjp),
  for a ``dot_general`` or ``conv_general_dilated`` whose output's trailing
  dims are weight-sized;
* :func:`find_dense_products_in_hlo` searches the compiled HLO text for a
  ``dot``, ``convolution`` (or matmul/conv custom call) of such a shape, after
  XLA's rewrites.

:func:`assert_no_dense_product` runs both (compiling ``fn`` itself);
:func:`assert_no_dense_product_in_stages` runs both on a program the test has
already traced and compiled with ``jax.jit``, so that it checks the very
program it ran at the cost of one compilation. Use distinct dimensions (say
``M=48, N=40, r=4``, and activations whose dims are none of these) so that a
shape match is unambiguous. Differentiate ``fn`` first (``jax.grad``) to check
the backward pass.

Examples:
  >>> import jax.numpy as jnp
  >>> from xrapture._src.testing import dense_check
  >>> x, w = jnp.ones((3, 48)), jnp.ones((48, 40))
  >>> b, a = jnp.ones((48, 4)), jnp.ones((4, 40))
  >>> dense_check.find_dense_products(
  ...     lambda x, w, b, a: x @ (w + b @ a), x, w, b, a, shapes=[(48, 40)])
  ['dot_general: f32[48,4] x f32[4,40] -> f32[48,40]']
"""

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax

from xrapture._src.implicit import compat
from xrapture._src.implicit import implicit_array
from xrapture._src.lora import lora_weight

Shape = tuple[int, ...]

_PRODUCT_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})

# `%name = f32[48,40]{1,0} dot(` ; also `convolution(` and `custom-call(`,
# possibly with a tuple result `(f32[48,40]{1,0}, u8[..]{0}) custom-call(`.
_HLO_OP = re.compile(
    r"=\s*\(?(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]\S*"
    r"(?:,\s*[^)]*\))?\s+(?P<op>dot|convolution|custom-call)\(")
_PRODUCT_CUSTOM_CALL = re.compile(r"matmul|gemm|conv|dot", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Target:
  """One weight to look for.

  Attributes:
    matrix: ``(M, N)``: a product whose trailing two dims are ``(M, N)`` or
      ``(N, M)`` is weight-sized (the grouped matrix a LoraWeight adapts).
    kernel: the kernel's non-stacked shape when it has three or more axes: a
      product whose trailing dims are a permutation of it is weight-sized (a
      multi-axis ``ΔW`` or kernel gradient in any axis order).
    any_conv: a user-given ``(M, N)``, whose kernel shape is unknown: an HLO
      convolution with both ``M`` and ``N`` anywhere among its dims counts.
  """
  matrix: tuple[int, int] | None
  kernel: tuple[int, ...] | None = None
  any_conv: bool = False


# Weight shapes, ``(M, N)`` or a kernel's full shape, or what weight_targets returns.
Shapes = Iterable[Sequence[int]] | Iterable[Target]


def weight_shapes(tree: Any) -> list[Shape]:
  """The grouped ``(M, N)`` of every implicit array (ndim >= 2) in ``tree``.

  For a LoraWeight, ``(prod(in), prod(out))`` of its layout; for another
  implicit array, its trailing two dims.
  """
  shapes: list[Shape] = []
  for target in weight_targets(tree):
    if target.matrix is not None and target.matrix not in shapes:  # never None here
      shapes.append(target.matrix)
  return shapes


def weight_targets(tree: Any) -> list[Target]:
  """What to look for, for every implicit array (ndim >= 2) in ``tree``."""
  targets = []
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=implicit_array.is_implicit):
    if not implicit_array.is_implicit(leaf) or leaf.ndim < 2:
      continue
    if isinstance(leaf, lora_weight.LoraWeight):
      stack, _, _ = leaf.groups
      kernel = tuple(n for d, n in enumerate(leaf.shape) if d not in stack)
      target = Target(leaf.grouped_shape, kernel if len(kernel) >= 3 else None)
    else:
      target = Target(tuple(leaf.shape[-2:]))
    if target not in targets:
      targets.append(target)
  return targets


def _user_target(shape: Sequence[int]) -> Target:
  """The target for a user-given ``(M, N)`` or kernel shape."""
  dims = tuple(int(d) for d in shape)
  if len(dims) == 2:
    m, n = dims
    return Target((m, n), any_conv=True)
  return Target(None, dims)


def _targets(shapes: Shapes | None, args: Any) -> list[Target]:
  if shapes is None:
    targets = weight_targets(args)
  else:
    targets = [s if isinstance(s, Target) else _user_target(s) for s in shapes]
  if not targets:
    raise ValueError("no weight shapes: pass shapes=[(M, N), ...] or implicit "
                     "arrays among the arguments.")
  return targets


def _weight_sized(dims: tuple[int, ...], targets: list[Target],
                  conv: bool = False) -> bool:
  """Whether a product's output dims are a target's matrix or kernel."""
  for t in targets:
    if t.matrix is not None and len(dims) >= 2 and dims[-2:] in (
        t.matrix, t.matrix[::-1]):
      return True
    k = len(t.kernel or ())
    if t.kernel and len(dims) >= k and sorted(dims[-k:]) == sorted(t.kernel):
      return True
    if conv and t.any_conv and t.matrix is not None:  # any_conv: a user's (M, N)
      m, n = t.matrix
      if m in dims and n in dims and (m != n or dims.count(m) > 1):
        return True
  return False


def _describe(targets: list[Target]) -> list[str]:
  return sorted({str(t.kernel or t.matrix) for t in targets}
                | {str(t.matrix) for t in targets if t.matrix})


def _aval_str(var: Any) -> str:
  aval = var.aval
  try:
    return aval.str_short(short_dtypes=True)
  except (AttributeError, TypeError):
    return str(aval)


def find_dense_products_in_jaxpr(
    jaxpr: Any, shapes: Shapes, _path: str = "") -> list[str]:
  """Like :func:`find_dense_products`, on a Jaxpr or ClosedJaxpr."""
  targets = _targets(shapes, None)
  found = []
  for eqn in compat.jaxpr_and_consts(jaxpr)[0].eqns:
    name = eqn.primitive.name
    where = f"{_path}{name}"
    if name in _PRODUCT_PRIMITIVES:
      for out in eqn.outvars:
        shape = tuple(getattr(out.aval, "shape", ()))
        if _weight_sized(shape, targets):
          ins = " x ".join(_aval_str(v) for v in eqn.invars)
          found.append(f"{where}: {ins} -> {_aval_str(out)}")
    for sub in compat.sub_jaxprs(eqn):
      found.extend(find_dense_products_in_jaxpr(
          sub.jaxpr, targets, _path=f"{where}[{sub.param}]/"))
  return found


def find_dense_products(
    fn: Callable[..., Any], *args: Any,
    shapes: Shapes | None = None, **kwargs: Any) -> list[str]:
  """Dense weight-sized products in ``fn``'s jaxpr, recursively.

  Args:
    fn: the function to trace (forward, or a ``jax.grad`` of it).
    *args: its arguments (pytrees; implicit arrays allowed).
    shapes: weight shapes: ``(M, N)`` (a product whose output's trailing two
      dims are ``(M, N)`` or ``(N, M)`` is reported; in HLO also a
      convolution with both anywhere), or a kernel's full shape with three or
      more axes (trailing dims that are its sizes in any order). Default:
      every implicit array in ``args`` and ``kwargs``, matched by its own
      grouped matrix and kernel shape, so that activations that merely share
      a channel count are not reported.
    **kwargs: keyword arguments of ``fn``.

  Returns:
    One line per offending equation, ``"<path>: <inputs> -> <output>"``,
    where the path names the enclosing higher-order primitives
    (``"pjit[jaxpr]/scan[jaxpr]/dot_general: ..."``). Empty if none.
  """
  targets = _targets(shapes, (args, kwargs))
  closed = jax.make_jaxpr(lambda a, k: fn(*a, **k))(args, kwargs)
  return find_dense_products_in_jaxpr(closed, targets)


def find_dense_products_in_hlo(
    fn: Callable[..., Any], *args: Any,
    shapes: Shapes | None = None, flattened: bool = False,
    **kwargs: Any) -> list[str]:
  """Dense weight-sized products in ``fn``'s compiled (optimized) HLO.

  Args:
    fn: the function to compile with ``jax.jit``.
    *args: its arguments.
    shapes: as in :func:`find_dense_products`.
    flattened: also match stacks of weights whose leading axes XLA merged
      into one: ``[L*M, N]``, or ``[N, L*M]`` (any output ``[..., N]`` whose
      other dims multiply to a multiple of ``M``, or ``[M, ...]`` whose other
      dims multiply to a multiple of ``N``). Only sound when no activation
      has such a shape: pick sizes that are not multiples of ``M`` or ``N``.
    **kwargs: keyword arguments of ``fn``.

  Returns:
    The offending HLO instruction lines, stripped of metadata: a ``dot``,
    ``convolution`` or matmul/conv ``custom-call`` whose output is
    weight-sized (see ``shapes`` of :func:`find_dense_products`). Empty if
    none.
  """
  targets = _targets(shapes, (args, kwargs))
  text = jax.jit(lambda a, k: fn(*a, **k)).lower(args, kwargs).compile().as_text()
  if text is None:  # Compiled.as_text() is None where the backend has no text form.
    raise RuntimeError(
        "This backend gives no text for the compiled HLO, so it cannot be searched; "
        "use find_dense_products_in_jaxpr instead.")
  return find_dense_products_in_hlo_text(text, targets, flattened)


def _hlo_weight_sized(op: str, dims: tuple[int, ...], targets: list[Target],
                      flattened: bool) -> bool:
  """Whether an HLO product's output looks weight-sized.

  A target's matrix as trailing dims, or its kernel's sizes (any order) as
  trailing dims (XLA computes a kernel gradient as ``[in, *window, out]`` and
  transposes); for a user-given ``(M, N)``, a convolution with ``M`` and ``N``
  anywhere; with ``flattened``, a stack whose leading axes XLA merged.
  """
  if len(dims) < 2:
    return False
  if _weight_sized(dims, targets, conv=op == "convolution"):
    return True
  if not flattened:
    return False
  for t in targets:
    for m, n in ((t.matrix, t.matrix[::-1]) if t.matrix else ()):
      if dims[-1] == n and math.prod(dims[:-1]) % m == 0:
        return True
      if dims[0] == m and math.prod(dims[1:]) % n == 0:
        return True
  return False


def find_dense_products_in_hlo_text(
    text: str, shapes: Shapes,
    flattened: bool = False) -> list[str]:
  """Like :func:`find_dense_products_in_hlo`, on HLO text."""
  targets = _targets(shapes, None)
  found = []
  for line in text.splitlines():
    match = _HLO_OP.search(line)
    if match is None:
      continue
    if match["op"] == "custom-call" and not _PRODUCT_CUSTOM_CALL.search(
        line.split("custom_call_target=", 1)[-1][:80]):
      continue
    dims = tuple(int(d) for d in match["dims"].split(",") if d)
    if _hlo_weight_sized(match["op"], dims, targets, flattened):
      found.append(line.split(", metadata=", 1)[0].strip())
  return found


def assert_no_dense_product(
    fn: Callable[..., Any], *args: Any,
    shapes: Shapes | None = None, hlo: bool = True,
    flattened: bool = False, **kwargs: Any) -> None:
  """Raises AssertionError if ``fn`` computes a dense weight-sized product.

  Checks the jaxpr (recursively) and, with ``hlo``, the compiled HLO.

  Args:
    fn: the function (forward, or a gradient of it).
    *args: its arguments.
    shapes: as in :func:`find_dense_products`.
    hlo: also compile ``fn`` and search its HLO.
    flattened: as in :func:`find_dense_products_in_hlo`.
    **kwargs: keyword arguments of ``fn``.

  Raises:
    AssertionError: listing every offending jaxpr equation and HLO line.
  """
  found = [f"jaxpr: {s}" for s in find_dense_products(
      fn, *args, shapes=shapes, **kwargs)]
  if hlo:
    found += [f"hlo: {s}" for s in find_dense_products_in_hlo(
        fn, *args, shapes=shapes, flattened=flattened, **kwargs)]
  if found:
    targets = _describe(_targets(shapes, (args, kwargs)))
    raise AssertionError(
        f"{len(found)} dense product(s) of weight shape(s) {', '.join(targets)}:\n  "
        + "\n  ".join(found))


def assert_no_dense_product_in_stages(
    traced: Any, compiled: Any, shapes: Shapes,
    flattened: bool = False) -> None:
  """Like :func:`assert_no_dense_product`, on ``jax.jit(fn).trace(*args)``.

  Args:
    traced: the ``jax.stages.Traced`` of ``jax.jit(fn)``; its jaxpr is searched.
    compiled: ``traced.lower().compile()``, whose HLO is searched; None to
      search the jaxpr only.
    shapes: as in :func:`find_dense_products` (or :func:`weight_targets`).
    flattened: as in :func:`find_dense_products_in_hlo`.

  Raises:
    AssertionError: listing every offending jaxpr equation and HLO line.
  """
  targets = _targets(shapes, None)
  found = [f"jaxpr: {s}" for s in find_dense_products_in_jaxpr(
      traced.jaxpr, targets)]
  if compiled is not None:
    text = compiled.as_text()
    if text is None:
      raise RuntimeError("This backend gives no text for the compiled HLO.")
    found += [f"hlo: {s}" for s in find_dense_products_in_hlo_text(
        text, targets, flattened)]
  if found:
    raise AssertionError(
        f"{len(found)} dense product(s) of weight shape(s) "
        f"{', '.join(_describe(targets))}:\n  " + "\n  ".join(found))
