"""How a model consumes each kernel: a stack of layers, a conv window, or both.

``hk.Conv1D`` gives ``[k, in, out]`` and ``hk.layer_stack`` of a Linear gives
``[L, in, out]``: identical shapes that need different adapters (one low-rank
pair spanning the window, or one pair per layer). Names do not tell them
apart; the jaxpr of ``apply`` does: every axis a ``scan`` slices off is a
layer axis, and a kernel that then reaches ``conv_general_dilated`` as its
right operand keeps its remaining leading axes as a window.
"""

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from xrapture._src.implicit import compat

# Primitives whose output is the kernel itself, re-typed or re-laid out.
_PASS_THROUGH = frozenset({
    "convert_element_type", "copy", "copy_p", "transpose", "rev",
    "reduce_precision", "optimization_barrier"})


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """Axes of a ``[*layers, *window, M, N]`` kernel.

  Attributes:
    layers: leading axes with one adapter pair per index (stacked layers).
    window: conv window axes after those (one pair spans them).
    scanned: leading axes that scans slice off before the parameter is used:
      a ``[L, D]`` bias of ``hk.layer_stack`` has ``scanned=1`` and is a
      vector, not a kernel.
  """
  layers: int
  window: int
  scanned: int = 0


def stacked(ndim: int, scanned: int = 0) -> KernelLayout:
  """Every leading axis a layer axis: the layout for kernels never seen in a conv."""
  return KernelLayout(layers=max(ndim - 2, 0), window=0, scanned=scanned)


def _sub_jaxprs(eqn) -> Iterator[tuple[Any, Sequence[int]]]:
  """(sub-jaxpr, for each of its invars the outer operand index) pairs."""
  name, params = eqn.primitive.name, eqn.params
  n = len(eqn.invars)
  if name == "cond":
    for branch in params["branches"]:
      yield branch, list(range(1, n))
  elif name == "while":
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    yield params["cond_jaxpr"], list(range(nc)) + list(range(nc + nb, n))
    yield params["body_jaxpr"], list(range(nc, n))
  else:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
      if key in params:
        yield params[key], list(range(n))
        return


def _terminal_uses(jaxpr: Any, var: Any, layers: int) -> Iterator[tuple[str, int]]:
  """``(kind, layer axes consumed)`` for every place ``var`` ends up."""
  jaxpr, _ = compat.jaxpr_and_consts(jaxpr)
  for eqn in jaxpr.eqns:
    for pos, v in enumerate(eqn.invars):
      if v is not var:
        continue
      name = eqn.primitive.name
      if name == "conv_general_dilated":
        yield ("conv" if pos == 1 else "other"), layers
      elif name in _PASS_THROUGH:
        yield from _terminal_uses(jaxpr, eqn.outvars[0], layers)
      elif name == "scan":
        num_consts, num_carry = compat.scan_counts(eqn)
        body, _ = compat.jaxpr_and_consts(eqn.params["jaxpr"])
        sliced = pos >= num_consts + num_carry
        yield from _terminal_uses(body, body.invars[pos], layers + int(sliced))
      else:
        subs = list(_sub_jaxprs(eqn))
        if not subs:
          yield name, layers
        for sub, outer_positions in subs:
          inner, _ = compat.jaxpr_and_consts(sub)
          for inner_pos, outer_pos in enumerate(outer_positions):
            if outer_pos == pos and inner_pos < len(inner.invars):
              yield from _terminal_uses(inner, inner.invars[inner_pos], layers)


def close_over_static(fn: Callable[..., Any], args: Sequence[Any],
                      kwargs: dict[str, Any]) -> tuple[Callable[..., Any], list[Any]]:
  """Splits ``fn(*args, **kwargs)`` into a function of its array leaves.

  Returns:
    ``(call, dynamic)``: ``call(dynamic)`` runs ``fn`` with every array (or
    ``jax.ShapeDtypeStruct``) leaf taken from ``dynamic``, in flattening
    order, and every other leaf (flags such as ``is_training``, ``None``)
    kept as the Python value it was; ``dynamic`` holds those leaves as
    ``jax.ShapeDtypeStruct``s, ready for ``jax.make_jaxpr``/``eval_shape``.
  """
  leaves, treedef = jax.tree_util.tree_flatten((tuple(args), kwargs))
  is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))
              for x in leaves]

  def call(dynamic):
    it = iter(dynamic)
    full = [next(it) if array else x for array, x in zip(is_array, leaves)]
    a, kw = jax.tree_util.tree_unflatten(treedef, full)
    return fn(*a, **kw)

  dynamic = [jax.ShapeDtypeStruct(np.shape(x), x.dtype)
             for array, x in zip(is_array, leaves) if array]
  return call, dynamic


def kernel_layouts(apply_fn, params, args, kwargs, wanted: Sequence[int]
                   ) -> dict[int, KernelLayout]:
  """Layouts of the params leaves at flat indices ``wanted``.

  Args:
    apply_fn: ``apply(params, *args, **kwargs)`` (``hk.transform(f).apply``
      with its rng already among ``args``).
    params: the params tree (arrays or ``jax.ShapeDtypeStruct``s).
    args, kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``s).
    wanted: indices into ``jax.tree.leaves(params)``.

  Returns:
    The layout of each wanted leaf.
  """
  p_leaves = jax.tree_util.tree_leaves(params)
  # Params come first among the array leaves, so invar i is params leaf i.
  call, dynamic = close_over_static(apply_fn, (params, *args), kwargs)
  jaxpr, _ = compat.jaxpr_and_consts(jax.make_jaxpr(call)(dynamic))
  layouts = {}
  for i in wanted:
    ndim = len(p_leaves[i].shape)
    uses = list(_terminal_uses(jaxpr, jaxpr.invars[i], 0))
    scanned = max((layers for _, layers in uses), default=0)
    conv_layers = [layers for kind, layers in uses if kind == "conv"]
    if conv_layers:
      layers = max(conv_layers)
      layouts[i] = KernelLayout(layers=layers, window=ndim - 2 - layers,
                                scanned=scanned)
    else:
      layouts[i] = stacked(ndim, scanned)
  return layouts
