"""How a model contracts each kernel, read from the jaxpr of ``apply``.

A kernel's shape does not say which matrix LoRA should factor: ``hk.Conv1D``
gives ``[k, in, out]`` and ``hk.layer_stack`` of a Linear ``[L, in, out]``;
an attention projection ``[in, heads, head_dim]`` is one matrix
``[in, heads·head_dim]``. The jaxpr of ``apply`` says it: each parameter is
followed from the input through ops that only re-lay it out (casts, copies,
transposes, reshapes, slices, splits, ``expand_dims``/``squeeze``, a
``scan`` that slices it, the bodies of ``jit``/``remat``/``cond``/``while``/
custom-derivative calls) to the ops that consume it, and each axis gets a
role (see :class:`KernelLayout`):

* ``dot_general``: contracted axes ``'i'``, free axes ``'o'``, batch axes
  ``'s'`` (per-expert or per-head kernels);
* ``conv_general_dilated`` (kernel side): window and input features ``'i'``,
  output features ``'o'``;
* ``ragged_dot``: group axis ``'s'``, contracted ``'i'``, the rest ``'o'``;
* ``gather`` of whole rows (an embedding lookup): the indexed axis ``'i'``,
  the rest ``'o'``;
* an axis a ``scan`` slices off, or that is indexed and squeezed away: ``'s'``.

Two uses agree when they stack the same axes and split the rest into the
same two groups, whichever is in and out (a tied embedding: looked up by
rows and used as ``x @ E.T``); the first use in program order sets the
orientation. Uses that disagree, and uses with no low-rank form (an
elementwise op on the kernel, a grouped conv), are recorded for
:func:`xrapture.transform`'s ``adapt`` to report.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from xrapture._src import pytypes
from xrapture._src.implicit import compat
from xrapture._src.lora import lora_weight

STACK, IN, OUT = lora_weight.STACK, lora_weight.IN, lora_weight.OUT

# Ops whose output is the kernel itself, re-typed or passed along; a
# LoraWeight handler keeps each of them low-rank.
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "optimization_barrier",
                           "device_put"})
# Ops that hold a jaxpr called with the eqn's operands, one to one.
_CALLS = (compat.JIT_NAMES | compat.CALL_NAMES | compat.REMAT_NAMES
          | compat.CUSTOM_JVP_NAMES | compat.CUSTOM_VJP_NAMES)
# Uses that adapt may target with targets=("all-linear",).
LINEAR_USES = frozenset({"dot_general", "conv_general_dilated", "ragged_dot_general",
                         "ragged_dot"})


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How ``apply`` uses one parameter.

  Attributes:
    layout: one of ``'s'`` (stacked), ``'i'`` (in group), ``'o'`` (out group)
      per axis: the :class:`xrapture.LoraWeight` layout to adapt it with.
    scanned: leading axes that scans slice off before the parameter is used:
      a ``[L, D]`` bias of ``hk.layer_stack`` has ``scanned=1`` and is a
      vector, not a kernel.
    uses: the primitives that consume it with a low-rank form, in program
      order, without repeats.
    problems: uses with no low-rank form, each ``"<primitive>: why"``.
    conflict: set when two uses group its axes differently: both uses.
    grouped_conv: it is the kernel of a grouped or depthwise conv.
  """
  layout: str
  scanned: int = 0
  uses: tuple[str, ...] = ()
  problems: tuple[str, ...] = ()
  conflict: str | None = None
  grouped_conv: bool = False

  @property
  def low_rank(self) -> bool:
    """Every use keeps a LoraWeight of this layout low-rank."""
    return not (self.problems or self.conflict or self.grouped_conv)

  def rank_limit(self, shape: Sequence[int]) -> int:
    """``min(prod(in), prod(out))``: the largest useful rank."""
    return min(lora_weight.grouped_shape(tuple(shape), self.layout))


def default(ndim: int, scanned: int = 0) -> KernelLayout:
  """0.1.0's layout (leading axes stacked, then in, out): for kernels never seen."""
  return KernelLayout(lora_weight.default_layout(ndim), scanned=scanned)


@dataclasses.dataclass(frozen=True)
class _Flow:
  """A value derived from parameter ``leaf`` by re-layout ops only.

  Attributes:
    leaf: the parameter's flat index.
    axes: for each axis of the value, the parameter's axes it holds.
    fixed: parameter axes given a role on the way (sliced off: stacked).
    scanned: leading axes scans sliced off so far.
  """
  leaf: int
  axes: tuple[frozenset[int], ...]
  fixed: tuple[tuple[int, str], ...] = ()
  scanned: int = 0

  def with_axes(self, axes, fixed=()):
    return dataclasses.replace(self, axes=tuple(axes), fixed=self.fixed + tuple(fixed))


@dataclasses.dataclass
class _Use:
  leaf: int
  primitive: str
  roles: dict[int, str] | None   # None: no low-rank form
  why: str = ""
  scanned: int = 0
  grouped_conv: bool = False


class _Walker:
  """Follows parameter flows through a jaxpr, collecting their uses."""

  def __init__(self, shapes: dict[int, tuple[int, ...]]):
    self.shapes = shapes
    self.uses: list[_Use] = []

  def use(self, flow, primitive, roles=None, why="", **kw):
    if roles is not None:
      merged = dict(flow.fixed)
      for k, role in roles.items():
        for d in flow.axes[k]:
          if merged.get(d, role) != role:
            roles, why = None, (f"axis {d} of the kernel would be both '{merged[d]}' "
                                f"and '{role}'")
            break
          merged[d] = role
        if roles is None:
          break
      else:
        roles = merged
    self.uses.append(_Use(flow.leaf, primitive, roles, why, flow.scanned, **kw))

  def problem(self, flow, primitive, why):
    self.use(flow, primitive, None, why)

  def walk(self, jaxpr, env: dict[Any, list[_Flow]]) -> list[list[_Flow]]:
    """Flows reaching each outvar of ``jaxpr`` given flows at its invars."""
    jaxpr, _ = compat.jaxpr_and_consts(jaxpr)
    env = dict(env)
    for eqn in jaxpr.eqns:
      incoming = [(pos, flow) for pos, v in enumerate(eqn.invars)
                  if not isinstance(v, compat.Literal) for flow in env.get(v, ())]
      if not incoming:
        continue
      outs = self.eqn(eqn, incoming)
      for k, flows in outs.items():
        if flows and not isinstance(eqn.outvars[k], compat.DropVar):
          env.setdefault(eqn.outvars[k], []).extend(flows)
    return [list(env.get(v, ())) if not isinstance(v, compat.Literal) else []
            for v in jaxpr.outvars]

  # One equation: returns {outvar index: flows}.
  def eqn(self, eqn, incoming):
    name, params = eqn.primitive.name, eqn.params
    outs: dict[int, list[_Flow]] = {}
    add = lambda k, flow: outs.setdefault(k, []).append(flow)
    in_shape = lambda pos: tuple(eqn.invars[pos].aval.shape)
    for pos, flow in incoming:
      if name in _PASS_THROUGH:
        add(pos if eqn.primitive.multiple_results else 0, flow)
      elif name == "transpose":
        add(0, flow.with_axes(flow.axes[p] for p in params["permutation"]))
      elif name in ("mul", "div", "neg"):
        others = [v for k, v in enumerate(eqn.invars) if k != pos]
        if (name == "div" and pos != 0) or any(v.aval.shape for v in others):
          self.problem(flow, name, "an elementwise product with an array")
        else:
          add(0, flow)
      elif name in ("slice", "dynamic_slice"):
        if pos == 0:
          add(0, flow)
        else:
          self.problem(flow, name, "the kernel is used as an index")
      elif name == "split":
        for k in range(len(eqn.outvars)):
          add(k, flow)
      elif name in ("concatenate", "stack"):
        tracked = {p for p, _ in incoming}
        if len(tracked) != len(eqn.invars):
          self.problem(flow, name, "joined with an array that is not a kernel")
        elif name == "stack":
          axes = list(flow.axes)
          axes.insert(params["axis"] % (len(axes) + 1), frozenset())
          add(0, flow.with_axes(axes))
        else:
          add(0, flow)
      elif name == "squeeze":
        self.squeeze(flow, in_shape(pos), params["dimensions"], add)
      elif name == "broadcast_in_dim":
        self.expand(flow, in_shape(pos), params, add)
      elif name == "reshape":
        self.reshape(flow, in_shape(pos), params, add)
      elif name == "dot_general":
        self.dot_general(flow, pos, params["dimension_numbers"], len(in_shape(pos)))
      elif name == "conv_general_dilated":
        self.conv(flow, pos, params)
      elif name in ("ragged_dot_general", "ragged_dot"):
        self.ragged_dot(flow, pos, params, len(in_shape(pos)))
      elif name == "gather":
        self.gather(flow, pos, params, in_shape(pos))
      elif name == "scan":
        self.scan(eqn, pos, flow, add)
      elif name == "while":
        self.while_loop(eqn, pos, flow)
      elif name == "cond":
        self.cond(eqn, pos, flow)
      elif name in _CALLS:
        self.call(eqn, pos, flow, add)
      else:
        self.problem(flow, name, "no low-rank form")
    return outs

  def squeeze(self, flow, shape, dimensions, add):
    dims = {d % len(shape) for d in dimensions}
    fixed: list[tuple[int, str]] = []
    for d in dims:
      full = math.prod(self.shapes[flow.leaf][a] for a in flow.axes[d])
      if full > 1:  # indexed down to one element: a stack
        fixed.extend((a, STACK) for a in flow.axes[d])
    add(0, flow.with_axes([a for d, a in enumerate(flow.axes) if d not in dims], fixed))

  def expand(self, flow, shape, params, add):
    out_shape = params["shape"]
    mapped = dict(zip(params["broadcast_dimensions"], range(len(shape))))
    if any(out_shape[o] != shape[d] for o, d in mapped.items()) or any(
        out_shape[o] != 1 for o in range(len(out_shape)) if o not in mapped):
      self.problem(flow, "broadcast_in_dim", "the kernel is broadcast")
      return
    add(0, flow.with_axes(flow.axes[mapped[o]] if o in mapped else frozenset()
                          for o in range(len(out_shape))))

  def reshape(self, flow, shape, params, add):
    if params.get("dimensions") is not None:
      self.problem(flow, "reshape", "a reshape with a transpose")
      return
    new = tuple(params["new_sizes"])
    cum_old, cum_new = np.cumprod((1,) + shape), np.cumprod((1,) + new)
    bounds = sorted(set(cum_old.tolist()) & set(cum_new.tolist()))
    run = lambda start: max(b for b in bounds if b <= start)
    held: dict[int, frozenset[int]] = {}
    for d, size in enumerate(shape):
      if size != 1:
        key = run(cum_old[d])
        held[key] = held.get(key, frozenset()) | flow.axes[d]
    add(0, flow.with_axes(held.get(run(cum_new[k]), frozenset()) if size != 1
                          else frozenset() for k, size in enumerate(new)))

  def dot_general(self, flow, pos, dimension_numbers, ndim):
    (lc, rc), (lb, rb) = dimension_numbers
    contract, batch = (lc, lb) if pos == 0 else (rc, rb)
    roles = {d: IN if d in contract else STACK if d in batch else OUT
             for d in range(ndim)}
    self.use(flow, "dot_general", roles)

  def conv(self, flow, pos, params):
    if pos != 1:
      self.problem(flow, "conv_general_dilated", "the kernel is used as the conv's input")
      return
    groups = (params["feature_group_count"], params["batch_group_count"])
    if groups != (1, 1):
      self.use(flow, "conv_general_dilated", None,
               f"a grouped conv (feature_group_count={groups[0]}, "
               f"batch_group_count={groups[1]})", grouped_conv=True)
      return
    out_dim, _, *_ = params["dimension_numbers"].rhs_spec
    roles = {d: OUT if d == out_dim else IN for d in range(len(flow.axes))}
    self.use(flow, "conv_general_dilated", roles)

  def ragged_dot(self, flow, pos, params, ndim):
    dn = params.get("ragged_dot_dimension_numbers")
    if pos != 1:
      self.problem(flow, "ragged_dot", "the kernel is ragged_dot's left operand")
      return
    if dn is None:
      contract, group = (1,), (0,)
    else:
      (_, contract), (_, batch) = dn.dot_dimension_numbers
      group = tuple(dn.rhs_group_dimensions)
      if batch:
        self.problem(flow, "ragged_dot_general", "batch dimensions")
        return
    roles = {d: STACK if d in group else IN if d in contract else OUT
             for d in range(ndim)}
    self.use(flow, "ragged_dot_general", roles)

  def gather(self, flow, pos, params, shape):
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    rows = (pos == 0 and not getattr(dn, "operand_batching_dims", ())
            and len(dn.collapsed_slice_dims) == 1
            and tuple(dn.start_index_map) == tuple(dn.collapsed_slice_dims)
            and sizes[dn.collapsed_slice_dims[0]] == 1
            and all(sizes[d] == shape[d] for d in range(len(shape))
                    if d != dn.collapsed_slice_dims[0]))
    if not rows:
      self.problem(flow, "gather", "not a lookup of whole rows")
      return
    axis = dn.collapsed_slice_dims[0]
    self.use(flow, "gather", {d: IN if d == axis else OUT for d in range(len(shape))})

  def scan(self, eqn, pos, flow, add):
    num_consts, num_carry = compat.scan_counts(eqn)
    body, _ = compat.jaxpr_and_consts(eqn.params["jaxpr"])
    if num_consts <= pos < num_consts + num_carry:
      self.problem(flow, "scan", "the kernel is in a scan carry (materialized)")
      return
    if pos >= num_consts + num_carry:
      flow = dataclasses.replace(
          flow, axes=flow.axes[1:], scanned=flow.scanned + 1,
          fixed=flow.fixed + tuple((a, STACK) for a in flow.axes[0]))
    outs = self.walk(body, {body.invars[pos]: [flow]})
    for k, flows in enumerate(outs):
      for f in flows:
        if k < num_carry:
          self.problem(f, "scan", "the kernel is in a scan carry (materialized)")
        # A kernel returned as a scan output is not used further here.
    del add

  def while_loop(self, eqn, pos, flow):
    nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    if pos >= nc + nb:
      self.problem(flow, "while", "the kernel is in a loop carry (materialized)")
      return
    key, inner_pos = ("cond_jaxpr", pos) if pos < nc else ("body_jaxpr", pos - nc)
    sub, _ = compat.jaxpr_and_consts(eqn.params[key])
    for flows in self.walk(sub, {sub.invars[inner_pos]: [flow]}):
      for f in flows:
        self.problem(f, "while", "the kernel is in a loop carry (materialized)")

  def cond(self, eqn, pos, flow):
    if pos == 0:
      self.problem(flow, "cond", "the kernel is a cond's predicate")
      return
    for branch in eqn.params["branches"]:
      sub, _ = compat.jaxpr_and_consts(branch)
      for flows in self.walk(sub, {sub.invars[pos - 1]: [flow]}):
        for f in flows:
          self.problem(f, "cond", "the kernel is returned from a cond (materialized)")

  def call(self, eqn, pos, flow, add):
    params = eqn.params
    sub = next(params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params)
    sub, _ = compat.jaxpr_and_consts(sub)
    if pos >= len(sub.invars):
      self.problem(flow, eqn.primitive.name, "an operand the call does not pass on")
      return
    for k, flows in enumerate(self.walk(sub, {sub.invars[pos]: [flow]})):
      for f in flows:
        add(k, f)


def _describe(use: _Use, shape) -> str:
  if use.roles is None:
    return f"{use.primitive} ({use.why})"
  groups = {r: [d for d in range(len(shape)) if use.roles.get(d) == r]
            for r in (STACK, IN, OUT)}
  parts = [f"{name} axes {tuple(groups[r])}" for name, r in
           (("stacked", STACK), ("in", IN), ("out", OUT)) if groups[r]]
  return f"{use.primitive} ({', '.join(parts)})"


def _partition(roles: dict[int, str], shape) -> tuple[frozenset, frozenset[frozenset]]:
  """(stacked axes, {in axes, out axes}) over axes of size > 1."""
  big = [d for d in range(len(shape)) if shape[d] != 1]
  stack = frozenset(d for d in big if roles.get(d) == STACK)
  ins = frozenset(d for d in big if roles.get(d) == IN)
  outs = frozenset(d for d in big if roles.get(d) == OUT)
  return stack, frozenset({ins, outs})


def _resolve(uses: list[_Use], shape: tuple[int, ...]) -> KernelLayout:
  """One kernel's layout from its uses, in program order."""
  ndim = len(shape)
  scanned = max((u.scanned for u in uses), default=0)
  problems = tuple(dict.fromkeys(_describe(u, shape) for u in uses if u.roles is None))
  grouped = any(u.grouped_conv for u in uses)
  low = [(u, u.roles) for u in uses if u.roles is not None]
  if not low:
    return dataclasses.replace(default(ndim, scanned), problems=problems,
                               grouped_conv=grouped)
  first, first_roles = low[0]
  conflict = None
  for other, other_roles in low[1:]:
    if _partition(other_roles, shape) != _partition(first_roles, shape):
      conflict = (f"{_describe(first, shape)} and {_describe(other, shape)} group "
                  "its axes differently")
      break
  chars: list[str] = []
  for d in range(ndim):
    role = first_roles.get(d) or next(
        (roles[d] for _, roles in low if d in roles), None)
    # An axis of size 1 no use names joins its neighbour's group.
    chars.append(role or (chars[-1] if chars else STACK))
  layout = "".join(chars)
  if conflict is None and lora_weight.layout_problem(shape, layout):
    problems += (f"{_describe(first, shape)}: no in or no out axes, so no low-rank "
                 "form",)
  return KernelLayout(layout, scanned, tuple(dict.fromkeys(u.primitive for u, _ in low)),
                      problems, conflict, grouped)


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
  is_array = [pytypes.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
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
      with its rng, and state, already among ``args``).
    params: the params tree (arrays or ``jax.ShapeDtypeStruct``s).
    args, kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``s).
    wanted: indices into ``jax.tree.leaves(params)``.

  Returns:
    The layout of each wanted leaf (0.1.0's default for one ``apply`` never
    uses).
  """
  p_leaves = jax.tree_util.tree_leaves(params)
  # Params come first among the array leaves, so invar i is params leaf i.
  call, dynamic = close_over_static(apply_fn, (params, *args), kwargs)
  jaxpr, _ = compat.jaxpr_and_consts(jax.make_jaxpr(call)(dynamic))
  shapes = {i: tuple(np.shape(p_leaves[i])) for i in wanted}
  walker = _Walker(shapes)
  walker.walk(jaxpr, {jaxpr.invars[i]: [_Flow(i, tuple(
      frozenset({d}) for d in range(len(shapes[i]))))] for i in wanted})
  by_leaf: dict[int, list[_Use]] = {i: [] for i in wanted}
  for use in walker.uses:
    by_leaf[use.leaf].append(use)
  return {i: _resolve(by_leaf[i], shapes[i]) for i in wanted}
