r"""Where xrapture's step spends its time over the bound, op by op, from XLA's trace.

    python benchmarks/profile.py                              # d=256, r=8
    python benchmarks/profile.py --d_model=512 --rank=16

A diagnostic beside ``breakdown.py``, which takes the LoRA rule apart by
swapping it. This one changes nothing: it runs the bound and xrapture's step
(``variants.py``) under ``jax.profiler``, reads the trace XLA:CPU writes for
every op it runs (each op of the compiled program, named as in its HLO), and
sorts each op of the compiled program by what it computes:

* ``dense products`` — dots and convolutions with no axis of the LoRA rank;
* ``rank products`` — those with one (``x @ b``, ``u @ a``, the adapters'
  gradients, ``∂u @ bᵀ``...), with their FLOPs, so that their speed can be
  read beside the dense products';
* ``unfused copies`` — copy and transpose ops XLA did not fuse;
* ``other ops`` — every other op, nearly all fusions (elementwise, reductions,
  layout changes, the low-rank add where XLA fused it into a neighbour).

Op times overlap (XLA runs independent ops on every thread), so their sum is
op-time, not wall time; the wall time of the profiled steps is given beside.
``host`` is the time from the jitted call to XLA's first op (argument
flattening and dispatch: xrapture's step has more leaves).

The rank must differ from every other size of the model (batch, heads, head
width, tokens, widths, vocabulary), or rank products could not be told apart:
the script refuses such a rank. Writes benchmarks/results/profile.json and .md.
"""

import bisect
import collections
import glob
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import lm
from benchmarks import report
from benchmarks import sizes
from benchmarks import tables
from benchmarks import timing
from benchmarks import variants

PROFILED_STEPS = flags.DEFINE_integer("profiled_steps", 10, "Steps of each variant traced.")

CATEGORIES = ("dense products", "rank products", "unfused copies", "other ops")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"([\w.\-]+): (\w+\[[\d,]*\])")
# name = shape(s) opcode(operands), attributes. A tuple shape holds spaces.
_INSTR = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(([^)]*)\)(.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")


def _dims(shape: str) -> tuple[int, ...]:
  """The dimensions of the first array shape in ``shape`` (() for a scalar)."""
  inner = _SHAPE.search(shape).group(1)
  return tuple(int(n) for n in inner.split(",")) if inner else ()


def _names(operands: str) -> list[str]:
  operands = _COMMENT.sub("", operands)   # the printer's /*index=5*/ markers
  return [t.strip().split()[-1].lstrip("%") for t in operands.split(",") if t.strip()]


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """The entry computation's ops of an optimized HLO module's text.

  Ops inside loops (``while`` bodies) are not listed: their loop is one op.

  Returns:
    name -> {"opcode", "dots": [(FLOPs, lhs dims, rhs dims, out dims)] of each
    dot or convolution it is or fuses (a convolution's FLOPs: 0)}.
  """
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = {
          "shapes": {n: _dims(s) for n, s in _PARAM.findall(header.group(2))}, "instrs": []}
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTR.match(line.strip()) if current else None
    if m:
      name, shape, opcode, operands, rest = m.groups()
      comp = computations[current]
      comp["shapes"][name] = _dims(shape) if _SHAPE.search(shape) else ()
      comp["instrs"].append((name, opcode, comp["shapes"][name], _names(operands), rest))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  def dots(comp, instrs):
    for _, opcode, out, operands, rest in instrs:
      if opcode in ("dot", "convolution"):
        lhs, rhs = (comp["shapes"].get(o, ()) for o in operands[:2])
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = math.prod(lhs[int(i)] for i in contract.group(1).split(",")
                      if i) if contract and lhs else 0
        yield 2 * math.prod(out) * k, lhs, rhs, out

  ops = {}
  main = computations[entry]
  for instr in main["instrs"]:
    name, opcode, _, _, rest = instr
    if opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
      continue
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = computations.get(called.group(1)) if called else None
    found = dots(body, body["instrs"]) if body else dots(main, [instr])
    ops[name] = {"opcode": opcode, "dots": list(found)}
  return ops


def category(op: dict[str, Any], rank: int) -> str:
  """Which of :data:`CATEGORIES` an op of :func:`parse_hlo` is in.

  A dot is a rank product when the rank is one of its own operands' or
  output's dimensions; an op fusing several dots, when any of them is.
  """
  if op["dots"]:
    rank_dot = any(rank in lhs + rhs + out for _, lhs, rhs, out in op["dots"])
    return "rank products" if rank_dot else "dense products"
  return "unfused copies" if op["opcode"] in ("copy", "transpose") else "other ops"


def _form(op: dict[str, Any]) -> str:
  return " + ".join(f"{list(lhs)} · {list(rhs)} → {list(out)}" for _, lhs, rhs, out in op["dots"])


def _trace_events(logdir: str):
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {logdir}")
  for plane in ProfileData.from_file(paths[0]).planes:
    for line in plane.lines:
      for ev in line.events:
        yield line.name, ev.name, ev.start_ns, ev.duration_ns


def profile_steps(variant: variants.JaxVariant, steps: int, rank: int) -> dict[str, Any]:
  """Op time by category per step, host time before XLA's first op, wall time."""
  ops = parse_hlo(variant.lower().compile().as_text())
  for _ in range(3):
    variant.step()
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, profiler_options=options)
    started = time.perf_counter_ns()
    for _ in range(steps):
      variant.step()
    ended = time.perf_counter_ns()
    jax.profiler.stop_trace()
    events = list(_trace_events(logdir))
  kinds = {name: category(op, rank) for name, op in ops.items()}
  totals = {c: {"ops": 0, "ms": 0.0, "gflop": 0.0} for c in CATEGORIES}
  forms = collections.defaultdict(lambda: {"ops": 0, "ms": 0.0, "gflop": 0.0})
  seen = collections.Counter()
  for _, name, _, duration in events:
    if name not in ops:
      continue
    seen[name] += 1
    counted = [totals[kinds[name]]]
    if kinds[name] == "rank products":
      counted.append(forms[_form(ops[name])])
    for t in counted:
      t["ops"] += 1
      t["ms"] += duration / 1e6
      t["gflop"] += sum(d[0] for d in ops[name]["dots"]) / 1e9
  untraced = sorted(set(ops) - set(seen))
  if untraced:
    raise RuntimeError(
        f"{len(untraced)} ops of the compiled program are not in XLA's trace (e.g. "
        f"{', '.join(untraced[:3])}): the trace and the HLO do not describe the same program, "
        "so no op can be sorted. Is this jax's CPU backend?")
  # Host time: from each jitted call (its outermost PjitFunction event) to XLA's next op.
  op_starts = sorted(s for _, name, s, _ in events if name in ops)
  first_op, inside = [], -1
  for start, duration in sorted((s, d) for _, name, s, d in events
                                if name.startswith("PjitFunction(")):
    if start > inside:
      inside = start + duration
      i = bisect.bisect_left(op_starts, start)
      if i < len(op_starts):
        first_op.append((op_starts[i] - start) / 1e6)
  def per_step(sums):
    return {key: {k: v / steps for k, v in t.items()} for key, t in sums.items()}
  return {"categories": per_step(totals),
          "rank_products_by_form": per_step(forms),
          "host_ms": float(np.median(first_op)) if first_op else None,
          "wall_ms": (ended - started) / 1e6 / steps,
          "ops_in_program": len(ops),
          "ops_traced_per_step": sum(seen.values()) / steps,
          "ops_not_traced_once_a_step": {n: c for n, c in seen.items() if c != steps},
          "program_ops_by_category": collections.Counter(kinds.values())}


def _check_rank(cfg: lm.Config) -> None:
  others = {"batch": cfg.batch, "heads": cfg.n_heads, "head width": cfg.d_model // cfg.n_heads,
            "tokens": cfg.seq_len, "d_model": cfg.d_model, "MLP width": cfg.mlp_ratio * cfg.d_model,
            "vocab": cfg.vocab, "batch × tokens": cfg.batch * cfg.seq_len}
  clash = [k for k, v in others.items() if v == cfg.rank]
  if clash:
    raise app.UsageError(
        f"--rank={cfg.rank} equals the model's {', '.join(clash)}: rank products could not "
        "be told apart from the others. Pick a rank that is not also a size of the model "
        "(e.g. --rank=8 at --d_model=256, --rank=16 at --d_model=512).")


def run(cfg: lm.Config, steps: int) -> dict[str, Any]:
  _check_rank(cfg)
  env = timing.environment()
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  adapted = variants.adapted_params(cfg, base)
  results = {"bound": profile_steps(variants.bound(cfg, base, batch), steps, cfg.rank)}
  if results["bound"]["program_ops_by_category"].get("rank products"):
    raise RuntimeError("the bound has ops with an axis of the rank: the rank clashes "
                       "with a size the check above does not know")
  results["xrapture"] = profile_steps(
      variants.xrapture_variant(cfg, base, adapted, batch), steps, cfg.rank)
  env["loadavg_end"] = timing.load_average()
  return {"environment": env, "config": cfg.__dict__, "steps": steps,
          "categories": list(CATEGORIES), **results}


def markdown(results: dict[str, Any]) -> str:
  return tables.profile_table(results)


def main(argv):
  sizes.start(argv)
  results = run(sizes.config(), PROFILED_STEPS.value)
  report.publish(sizes.OUT.value, "profile", results, markdown(results))


if __name__ == "__main__":
  flags.FLAGS.set_default("d_model", 256)
  app.run(main)
