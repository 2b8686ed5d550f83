r"""The READMEs' benchmark tables, rendered from the result files.

    python benchmarks/tables.py           # rewrites README.md's and benchmarks/README.md's tables
    python benchmarks/tables.py --check   # exits 1 if a table differs from its results

Every table of figures in the two READMEs sits between ``<!-- table: NAME -->``
and ``<!-- end table: NAME -->`` and is rendered here from
``benchmarks/results/*.json``, with each target's met/missed, so the READMEs
show what the benchmarks wrote, never numbers typed by hand. A benchmark run
rewrites its JSON; this script then rewrites the tables
(``xrapture_test/bench_tables_test.py`` fails while they differ).
"""

import json
import os
import pathlib
import re
import sys
from typing import Any, Callable

# Run as a script: the repository root, appended.
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import rss  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import targets  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")
_BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- end table: \2 -->)", re.S)

MEMORY_TARGET = targets.MEMORY_OVER_FULL
REMAT_STEP_TARGET = targets.REMAT_STEP_OVER_LORA
SCALING_PEFT_TARGET = targets.SCALING_OVER_PEFT

# The CPU timings depend on the machine (whose GEMMs, torch's or XLA's, are faster on
# it), so they are kept for more than one: results/*.json from the first machine,
# results/<dir>/*.json from each other one (the same scripts, run with
# --out=benchmarks/results/<dir>/<name>.json). Table name suffix -> directory.
OTHER_CPUS = {"amd-epyc": "amd_epyc"}
# The README's CPU tip for the optimizer (variants.xrapture_variant(flat_optimizer=True)).
FLAT_OPTIMIZER = "optax.flatten(adam)"


def _load(results: pathlib.Path, name: str) -> dict[str, Any]:
  with open(results / f"{name}.json", encoding="utf-8") as f:
    return json.load(f)


def _met(ok: bool) -> str:
  return "yes" if ok else "**no**"


def _gflop_per_s(gflop: float, ms: float) -> str:
  return f"{gflop / ms * 1e3:.0f}" if gflop and ms else ""


def _mib(n: float) -> str:
  return f"{n / 2**20:,.0f} MiB"


def _env(env: dict[str, Any]) -> str:
  return "_" + report.environment_line(env) + "_"


def _net_rss(child: dict[str, Any]) -> int:
  net = rss.step_net(child)
  if net is None:
    raise KeyError(f"{child.get('variant')}: no steady-state step peak was measured")
  return net


_VARIANTS = {"full": "dense full fine-tune", "bound": "bound: forward + input gradients",
             "naive": "hand-written Haiku LoRA `x@W + (x@b)@a·s`",
             "xrapture": "**xrapture on the unmodified model**",
             "peft": "HuggingFace PEFT LoRA (torch)"}


def step_time_variants(results: pathlib.Path, name: str = "step_time") -> str:
  """Each variant's step: median ms, ÷ the bound's median, trainable values."""
  r = _load(results, name)
  step, bound = r["step_ms"], r["step_ms"]["bound"]["median_ms"]
  rows = [[_VARIANTS[v], f"{step[v]['median_ms']:.1f}", f"{step[v]['median_ms'] / bound:.2f}",
           f"{r['params']['trainable'][v]:,}",
           f"{r['params']['opt_state_bytes'][v] / 1e6:,.2f} MB"]
          for v in _VARIANTS if v in step]
  cfg = r["config"]
  return "\n".join([
      _env(r["environment"]) + f"; d={cfg['d_model']}, {cfg['n_layers']} layers, "
      f"T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']}; "
      f"{step['bound']['n']} alternated rounds.", "",
      report.markdown_table(["variant", "median ms", "÷ bound", "trainable",
                             "optimizer state"], rows)])


def _ratio_row(label: str, v: dict[str, Any], target: Any) -> list[str]:
  shown = (f"{target[0]}–{target[1]}" if isinstance(target, (list, tuple))
           else f"≤ {target}")
  return [label, f"{v['median']:.2f}", f"{v['q1']:.2f}–{v['q3']:.2f}", shown,
          report.met(v["median"], target)]


def step_time_ratios(results: pathlib.Path, name: str = "step_time") -> str:
  """The paired ratios against their targets."""
  r = _load(results, name)
  ratios = r["step_ratios"]
  rows = [_ratio_row(f"xrapture step ÷ {what}", ratios[f"xrapture/{key}"],
                     ratios[f"xrapture/{key}"]["target"])
          for key, what in (("bound", "bound"), ("naive", "hand-written LoRA"),
                            ("peft", "PEFT")) if f"xrapture/{key}" in ratios]
  rows.append(_ratio_row("jit compile, xrapture ÷ hand-written", r["compile"]["xrapture/naive"],
                         r["compile"]["xrapture/naive"]["target"]))
  merged = r["inference_ratios"]["merged/base"]
  rows.append(_ratio_row("inference, merged params ÷ base", merged, merged["target"]))
  return report.markdown_table(["measure (median of paired ratios)", "value", "IQR", "target",
                                "met"], rows)


def memory(results: pathlib.Path) -> str:
  """Step peak RSS and XLA's plan per variant and batch, ÷ full fine-tuning's."""
  r = _load(results, "memory")
  children = r["children"]
  rows = []
  for batch in r["batches"]:
    full = children[f"full B={batch}"]
    for variant in ("xrapture", "naive", "peft"):
      child = children.get(f"{variant} B={batch}")
      if child is None:
        continue
      rss = _net_rss(child) / _net_rss(full)
      plan = child["xla"]["total"] / full["xla"]["total"] if "xla" in child else None
      rows.append([batch, _VARIANTS[variant].strip("*"), _mib(_net_rss(child)),
                   _mib(_net_rss(full)), f"{rss:.2f}",
                   "" if plan is None else f"{plan:.2f}", _met(rss <= MEMORY_TARGET)])
  return "\n".join([
      _env(r["environment"]), "",
      report.markdown_table(["B", "variant", "step peak RSS − runtime", "full fine-tune's",
                             "÷ full", "XLA step plan ÷ full's", f"≤ {MEMORY_TARGET}"], rows)])


def _remat_rss(results: pathlib.Path) -> dict[str, float]:
  """Step peak RSS ÷ full fine-tuning's at B=4, by remat policy ('lora': none).

  From every ``memory_remat*.json`` (``memory.py --batches=4 --remat=<policy>``),
  each recording its policy.

  Raises:
    FileNotFoundError: there is none.
  """
  rss = {}
  paths = sorted(results.glob("memory_remat*.json"))
  if not paths:
    raise FileNotFoundError(2, "no remat memory run", str(results / "memory_remat.json"))
  for path in paths:
    m = _load(results, path.stem)
    full = _net_rss(m["children"]["full B=4"])
    rss[m["remat_policy"]] = _net_rss(m["children"]["xrapture_remat B=4"]) / full
    if "xrapture B=4" in m["children"]:
      rss["lora"] = _net_rss(m["children"]["xrapture B=4"]) / full
  return rss


def _remat_label(policy: str) -> str:
  name, _, count = policy.partition(":")
  return f"`hk.remat`, `{name}`" + (f", first {count} blocks" if count else "")


def remat(results: pathlib.Path) -> str:
  """LoRA with each block under hk.remat: memory ÷ full, step ÷ plain LoRA."""
  r = _load(results, "remat")
  plans = r["plan_bytes"]
  rss = _remat_rss(results)
  rows = []
  for name in ("lora", *r["step_ratios"]):
    ratio = r["step_ratios"].get(name)
    mem = rss.get(name)
    plan = plans[name] / plans["full"]
    label = "every activation kept" if name == "lora" else _remat_label(name)
    step = ratio["median"] if ratio else 1.0
    ok = (mem if mem is not None else plan) <= MEMORY_TARGET and step <= REMAT_STEP_TARGET
    rows.append([label, "" if mem is None else f"{mem:.3f}", f"{plan:.3f}",
                 "1" if ratio is None else report.median_iqr(ratio),
                 _met(ok) + (" (by the plan: RSS not measured)" if mem is None else "")])
  return "\n".join([
      _env(r["environment"]), "",
      report.markdown_table(["LoRA", "step peak RSS ÷ full fine-tuning's",
                             "XLA step plan ÷ full's", "step ÷ plain LoRA's (IQR)",
                             f"memory ≤ {MEMORY_TARGET}, step ≤ {REMAT_STEP_TARGET}"], rows)])


def _scaling_points(r: dict[str, Any]):
  for width, w in sorted(r["widths"].items(), key=lambda kv: int(kv[0])):
    for p in w["points"]:
      yield int(width), p, targets.point_target(int(width), p)


def _miss(value: float, limit: float) -> str:
  """A sweep cell's mark: " ✗" where ``value`` is over ``limit``."""
  return "" if value <= limit else " ✗"


def _sweep(r: dict[str, Any], cell: Callable[[dict[str, Any], float], str], legend: str,
           note: str = "", full_column: bool = True) -> str:
  """A scaling.py result as a table: a row per width, ``cell(point, target)`` per rank."""
  ranks = [p["rank"] for p in next(iter(r["widths"].values()))["points"]]
  cells: dict[int, list[str]] = {}
  for width, p, target in _scaling_points(r):
    cells.setdefault(width, []).append(cell(p, target))
  rows = [[width, f"{r['widths'][str(width)]['step_ms']['bound']['median_ms']:.1f}", *row,
           *([f"{r['widths'][str(width)]['full_over_bound']:.2f}"] if full_column else [])]
          for width, row in cells.items()]
  return "\n".join([
      _env(r["environment"]) + f"; {r['n_layers']} layers, T={r['seq_len']}, "
      f"B={r['batch']}, vocab {r['vocab']}; {r['rounds']} alternated rounds per width{note}.",
      "", legend, "",
      report.markdown_table(["d", "bound ms", *(f"r={k}" for k in ranks),
                             *(["full ÷ bound"] if full_column else [])], rows)])


def scaling(results: pathlib.Path, name: str = "scaling",
            peft_target: float = SCALING_PEFT_TARGET) -> str:
  """xrapture ÷ bound and ÷ PEFT at every width and rank, against the targets."""
  r = _load(results, name)

  def cell(p, target):
    x = p["xrapture"]["bound"]
    text = f"{x:.3f} / {target:.3f}{_miss(x, target)}"
    if "xrapture_over_peft" in p:
      q = p["xrapture_over_peft"]
      text += f"; {q:.3f}{_miss(q, peft_target)}"
    return text
  with_peft = any("xrapture_over_peft" in p for _, p, _ in _scaling_points(r))
  return _sweep(r, cell, "Each cell: xrapture ÷ bound / its target 1 + 3r/d + 0.03" +
                (f"; xrapture ÷ PEFT (target ≤ {peft_target})" if with_peft else "") +
                "; ✗ where missed.")


def scaling_flat(results: pathlib.Path) -> str:
  """scaling.py --flat_optimizer: xrapture with Adam under optax.flatten and with plain Adam."""
  def cell(p, target):
    f, x = p["xrapture_flat"]["bound"], p["xrapture"]["bound"]
    return (f"{f:.3f} / {target:.3f}{_miss(f, target)}; {x:.3f}{_miss(x, target)}; "
            f"{p['flat_over_plain']:.3f}")
  return _sweep(
      _load(results, "scaling_flat"), cell,
      f"Each cell: xrapture with `{FLAT_OPTIMIZER}` ÷ bound / the target 1 + 3r/d + "
      "0.03; with plain `optax.adam` ÷ bound; the first ÷ the second (paired). ✗ where missed.",
      note=", both optimizers in the same round robin", full_column=False)


def gemm_table(r: dict[str, Any]) -> str:
  """benchmarks/gemm.py: one block's dense products, torch's time ÷ XLA's."""
  rows = []
  for d, w in sorted(r["widths"].items(), key=lambda kv: int(kv[0])):
    ratio, xla, torch_ms = (w["torch_over_xla"], w["step_ms"]["xla"]["median_ms"],
                            w["step_ms"]["torch"]["median_ms"])
    rows.append([d, f"{w['gflop']:.2f}", f"{xla:.1f}", _gflop_per_s(w["gflop"], xla),
                 f"{torch_ms:.1f}", _gflop_per_s(w["gflop"], torch_ms),
                 report.median_iqr(ratio)])
  return "\n".join([
      _env(r["environment"]) + f"; {r['tokens']} tokens, float32, {r['threads']} threads, "
      f"{r['rounds']} alternated rounds. One block's dense products (q, k, v, out, up, "
      "down), each as `x @ w` and `∂y @ wᵀ`.", "",
      report.markdown_table(["d", "GFLOP", "XLA ms", "XLA GFLOP/s", "torch ms",
                             "torch GFLOP/s", "torch ÷ XLA (IQR)"], rows)])


def breakdown_table(results: dict[str, Any]) -> str:
  """benchmarks/breakdown.py's step with the LoRA rule taken apart, ÷ the bound."""
  cfg, over = results["config"], results["over_bound"]
  rows, previous = [], 1.0
  for name in results.get("variants", over):
    v = over[name]["median"]
    rows.append([name, f"{results['step_ms'][name]['median_ms']:.1f}", f"{v:.3f}",
                 f"{over[name]['q1']:.3f}–{over[name]['q3']:.3f}", f"{v - previous:+.3f}"])
    previous = v
  return "\n".join([
      _env(results["environment"]) + f"; d={cfg['d_model']}, {cfg['n_layers']} layers, "
      f"T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']}; bound "
      f"{results['step_ms']['bound']['median_ms']:.1f} ms; "
      f"{over['xrapture']['n']} alternated rounds.", "",
      report.markdown_table(["lora_matmul rule (optimizer)", "step ms (median)",
                             "÷ bound (paired)", "IQR",
                             "added over the row above"], rows)])


def profile_table(r: dict[str, Any]) -> str:
  """benchmarks/profile.py: the two steps' ops from XLA's trace, by what they compute."""
  cfg, b, x = r["config"], r["bound"], r["xrapture"]
  rows = []
  for c in r["categories"]:
    cb, cx = b["categories"][c], x["categories"][c]
    rows.append([c, f"{cb['ops']:.0f}", f"{cb['ms']:.2f}", f"{cx['ops']:.0f}",
                 f"{cx['ms']:.2f}", f"{cx['ms'] - cb['ms']:+.2f}",
                 _gflop_per_s(cx["gflop"], cx["ms"])])
  if b["host_ms"] is not None and x["host_ms"] is not None:
    rows.append(["host, call to first op", "", f"{b['host_ms']:.2f}", "",
                 f"{x['host_ms']:.2f}", f"{x['host_ms'] - b['host_ms']:+.2f}", ""])
  rows.append(["wall time of a profiled step", "", f"{b['wall_ms']:.1f}", "",
               f"{x['wall_ms']:.1f}", f"{x['wall_ms'] - b['wall_ms']:+.1f}", ""])
  forms = sorted(x.get("rank_products_by_form", {}).items(), key=lambda kv: -kv[1]["ms"])
  form_rows = [[f"`{form}`", f"{t['ops']:.0f}", f"{t['ms']:.2f}",
                f"{t['ms'] / t['ops'] * 1e3:.0f}", _gflop_per_s(t["gflop"], t["ms"])]
               for form, t in forms if t["ops"]]
  return "\n".join([
      _env(r["environment"]) + f"; d={cfg['d_model']}, {cfg['n_layers']} layers, "
      f"T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']}; {r['steps']} profiled "
      "steps each. Per step: ops run and their summed time (ms; ops overlap across "
      "threads, so the sum exceeds the wall time; tracing costs each op a little, so "
      "the profiled steps are slower than the timed benchmarks').", "",
      report.markdown_table(["ops", "bound: ops", "bound: op-ms", "xrapture: ops",
                             "xrapture: op-ms", "added op-ms", "xrapture GFLOP/s"], rows),
      "", "xrapture's rank products by shape (`lhs · rhs → out`), per step:", "",
      report.markdown_table(["product", "ops", "op-ms", "µs per op", "GFLOP/s"], form_rows)])


def first_step(results: pathlib.Path) -> str:
  """First step (trace + lower + compile + run) by depth, xrapture ÷ hand-written."""
  r = _load(results, "first_step")
  rows = []
  for depth, d in sorted(r["depths"].items(), key=lambda kv: int(kv[0])):
    x, n, ratio = d["seconds"]["xrapture"], d["seconds"]["naive"], d["ratio"]
    target = ratio.get("target", r.get("target", targets.FIRST_STEP_OVER_NAIVE))
    rows.append([depth, f"{x['trace']:.2f} / {n['trace']:.2f}",
                 f"{x['compile']:.2f} / {n['compile']:.2f}",
                 f"{x['total']:.2f} / {n['total']:.2f}",
                 report.median_iqr(ratio), report.met(ratio["median"], target)])
  cfg = r["config"]
  return "\n".join([
      _env(r["environment"]) + f"; d={cfg['d_model']}, T={cfg['seq_len']}, "
      f"B={cfg['batch']}, r={cfg['rank']}; {r['rounds']} alternated rounds.", "",
      report.markdown_table(["layers", "trace s (xrapture / hand-written)", "compile s",
                             "first step s", "xrapture ÷ hand-written (IQR)",
                             f"≤ {r.get('target', targets.FIRST_STEP_OVER_NAIVE)}"], rows)])


def qlora(results: pathlib.Path) -> str:
  """QLoRA's memory against LoRA and full fine-tuning, and its step time."""
  r = _load(results, "qlora")
  mem, ratios = r["memory"], r["ratios"]
  names = {"full": "full fine-tune", "lora": "LoRA, fp32 base", "qlora-nf4": "QLoRA NF4",
           "qlora-nf4-dq": "QLoRA NF4 + double quant", "qlora-int8": "QLoRA int8"}

  def cell(key):
    v = ratios.get(key)
    return "" if v is None else f"{v['ratio']:.3f}" + ("" if v["met"] else " ✗")
  rows = []
  for name, label in names.items():
    if name not in mem:
      continue
    m = mem[name]
    rows.append([label, _mib(m["param_bytes"]), _mib(_net_rss(m)), _mib(m["xla"]["total"]),
                 cell(f"{name} / lora: step peak RSS − runtime"),
                 cell(f"{name} / lora: XLA step plan"),
                 cell(f"{name} / full: step peak RSS − runtime"),
                 cell(f"{name} / full: XLA step plan")])
  time_key = "qlora-nf4 / lora: step time (median of paired ratios)"
  lines = [_env(r["environment"]), "",
           report.markdown_table(["", "params", "step peak RSS", "XLA plan", "RSS ÷ LoRA",
                                  "plan ÷ LoRA", "RSS ÷ full", "plan ÷ full"], rows), "",
           "Targets: " + "; ".join(
               f"QLoRA NF4 ÷ {other.replace('lora', 'LoRA')} ≤ {t}" for other, t in sorted(
                   {k.split(" / ")[1].split(":")[0]: v["target"] for k, v in ratios.items()
                    if k.startswith("qlora-nf4 /") and "time" not in k}.items()))
           + "; ✗ where missed."]
  if time_key in ratios:
    t = ratios[time_key]
    lines += ["", f"Step time, QLoRA NF4 ÷ LoRA (median of paired ratios): {t['ratio']:.2f} "
              f"(target ≤ {t['target']}: {'met' if t['met'] else 'missed'})."]
  return "\n".join(lines)


def gpu(results: pathlib.Path) -> str:
  """The step-time benchmark on a GPU, and memory there."""
  rows = []
  for name in ("step_time_gpu", "step_time_gpu_large"):
    if not (results / f"{name}.json").exists():
      continue
    r = _load(results, name)
    cfg, ms, ratios = r["config"], r["step_ms"], r["step_ratios"]
    model = (f"d={cfg['d_model']}, {cfg['n_layers']} layers, B={cfg['batch']}, "
             f"T={cfg['seq_len']} ({r['params']['base'] / 1e6:.1f}M)")
    rows.append([model, *(f"{ms[v]['median_ms']:.1f} ms" for v in
                          ("full", "bound", "naive", "xrapture", "peft")),
                 *(f"{ratios[k]['median']:.2f}" + (
                     " ✗" if cfg["d_model"] >= 2048 and ratios[k]["median"] > t else "")
                   for k, t in (("xrapture/bound", targets.GPU_OVER_BOUND),
                                ("xrapture/naive", targets.GPU_OVER_NAIVE),
                                ("xrapture/peft", targets.GPU_OVER_PEFT))),
                 f"{r['compile']['xrapture/naive']['median']:.2f}",
                 f"{r['inference_ratios']['merged/base']['median']:.2f}"])
  env = _load(results, "step_time_gpu")["environment"]
  lines = [_env(env), "",
           report.markdown_table(["model", "full", "bound", "hand-written", "xrapture", "PEFT",
                                  "xrapture ÷ bound", "÷ hand-written", "÷ PEFT", "compile ÷",
                                  "merged ÷ base"], rows)]
  lines += ["", f"GPU targets (d ≥ 2048): ÷ bound ≤ {targets.GPU_OVER_BOUND}, ÷ hand-written "
            f"≤ {targets.GPU_OVER_NAIVE}, ÷ PEFT ≤ {targets.GPU_OVER_PEFT}; ✗ where missed."]
  if (results / "scaling_gpu.json").exists():
    lines += ["", scaling(results, "scaling_gpu", targets.GPU_OVER_PEFT)]
  if (results / "memory_gpu.json").exists():
    m = _load(results, "memory_gpu")
    full, lora = m["children"]["full B=4"], m["children"]["xrapture B=4"]
    lines += ["", f"Memory on the GPU (B=4, {full['params'] / 1e6:.1f}M params, device "
              f"`peak_bytes_in_use`): full fine-tune {_mib(full['device_peak'])}, xrapture "
              f"{_mib(lora['device_peak'])}: {lora['device_peak'] / full['device_peak']:.2f} "
              f"(XLA plan {lora['xla']['total'] / full['xla']['total']:.2f})."]
  return "\n".join(lines)


def _step_time_targets(results: pathlib.Path, on: str = "") -> list[list[str]]:
  st = _load(results, "step_time")
  ratios, rows = st["step_ratios"], []
  for key, what in (("bound", "bound (forward + input gradients)"),
                    ("naive", "hand-written LoRA"), ("peft", "PEFT")):
    v = ratios.get(f"xrapture/{key}")
    if v is not None:
      rows.append([f"step ≤ {v['target']}× {what}, d={st['config']['d_model']}{on}",
                   f"{v['median']:.2f}", report.met(v["median"], v["target"])])
  c = st["compile"]["xrapture/naive"]
  rows.append([f"jit compile ≤ {c['target']}× hand-written{on}", f"{c['median']:.2f}",
               report.met(c["median"], c["target"])])
  m = st["inference_ratios"]["merged/base"]
  rows.append([f"merged-params inference ÷ base in {m['target'][0]}–{m['target'][1]}{on}",
               f"{m['median']:.3f}", report.met(m["median"], m["target"])])
  return rows


def _scaling_targets(results: pathlib.Path, on: str = "", name: str = "scaling",
                     key: str = "xrapture", how: str = "") -> list[list[str]]:
  points = list(_scaling_points(_load(results, name)))
  over = [(p[key]["bound"] - t, w, p, t) for w, p, t in points]
  _, width, point, target = max(over, key=lambda o: o[0])
  met = sum(o[0] <= 0 for o in over)
  rows = [[f"step ÷ bound ≤ 1 + 3r/d + 0.03 at every width and rank{how}{on}",
           f"{met} of {len(over)} points; worst d={width}, r={point['rank']}: "
           f"{point[key]['bound']:.2f} (target {target:.2f})", _met(met == len(over))]]
  peft = [(p["xrapture_over_peft"], w, p["rank"]) for w, p, _ in points
          if "xrapture_over_peft" in p]
  if peft:
    worst, width, rank = max(peft)
    met = sum(q <= SCALING_PEFT_TARGET for q, _, _ in peft)
    rows.append([f"step ÷ PEFT ≤ {SCALING_PEFT_TARGET} at every width and rank{on}",
                 f"{met} of {len(peft)} points; worst d={width}, r={rank}: {worst:.2f}",
                 _met(met == len(peft))])
  return rows


def _scaling_flat_targets(results: pathlib.Path, on: str = "") -> list[list[str]]:
  """The scaling targets with the optimizer under optax.flatten (``scaling_flat.json``)."""
  return _scaling_targets(results, on, name="scaling_flat", key="xrapture_flat",
                          how=f", `{FLAT_OPTIMIZER}` (README's CPU tip)")


def _memory_targets(results: pathlib.Path, on: str = "") -> list[list[str]]:
  mem, rows = _load(results, "memory"), []
  for batch in mem["batches"]:
    full, lora = mem["children"][f"full B={batch}"], mem["children"][f"xrapture B={batch}"]
    v = _net_rss(lora) / _net_rss(full)
    rows.append([f"LoRA step peak memory ≤ {MEMORY_TARGET}× full fine-tune, B={batch}{on}",
                 f"{v:.2f}", _met(v <= MEMORY_TARGET)])
  return rows


def _remat_targets(results: pathlib.Path, on: str = "") -> list[list[str]]:
  # Met if any policy with a measured RSS meets both; shown: the fastest that
  # does, else the one that saves the most memory.
  rss, steps = _remat_rss(results), _load(results, "remat")["step_ratios"]
  measured = [(rss[p], steps[p]["median"], p) for p in rss if p in steps]
  meeting = [m for m in measured if m[0] <= MEMORY_TARGET and m[1] <= REMAT_STEP_TARGET]
  if not measured:
    return [[f"with `hk.remat`, B=4{on}", "not measured yet: no policy has both a "
             "`remat.py` step and a `memory.py` RSS run", ""]]
  v, s, policy = (min(meeting, key=lambda m: m[1]) if meeting
                  else min(measured, key=lambda m: m[0]))
  return [[f"with {_remat_label(policy)}, B=4: memory ≤ {MEMORY_TARGET}× full, "
           f"step ≤ {REMAT_STEP_TARGET}× plain LoRA{on}", f"{v:.2f}, {s:.2f}",
           _met(bool(meeting))]]


def _first_step_targets(results: pathlib.Path, on: str = "") -> list[list[str]]:
  fs = _load(results, "first_step")
  deepest = max(fs["depths"], key=int)
  ratio = fs["depths"][deepest]["ratio"]
  target = ratio.get("target", targets.FIRST_STEP_OVER_NAIVE)
  return [[f"first step of a {deepest}-layer model ≤ {target}× hand-written{on}",
           f"{ratio['median']:.2f}", _met(ratio["median"] <= target)]]


def _machine(results: pathlib.Path) -> str:
  """The CPU a result set ran on, from its runs (``Intel Xeon``, ``AMD EPYC``)."""
  for name in ("step_time", "scaling", "memory"):
    if (results / f"{name}.json").exists():
      cpu = _load(results, name)["environment"]["machine"].rsplit(",", 1)[0]
      return cpu.replace("(R)", "").replace(" Processor", "").strip()
  return results.name


def targets_table(results: pathlib.Path) -> str:
  """Every performance target, its measured value and whether it is met.

  When results/ holds more than one machine's (:data:`OTHER_CPUS`), every row
  names its machine, and the timing targets get a row per machine.
  """
  others = [results / d for d in OTHER_CPUS.values() if (results / d).is_dir()]
  rows = []

  def add(part, machine):
    on = f" ({_machine(machine)})" if others else ""
    try:
      rows.extend(part(machine, on))
    except FileNotFoundError as e:
      rows.append([part.__name__.strip("_").replace("_", " ") + on,
                   f"not measured yet: no `{pathlib.Path(e.filename).name}`", ""])

  for part in (_step_time_targets, _scaling_targets, _scaling_flat_targets):
    for machine in [results, *others]:
      add(part, machine)
  add(_memory_targets, results)
  for part in (_remat_targets, _first_step_targets):
    for machine in [results, *others]:
      add(part, machine)
  return report.markdown_table(["target (CPU)", "measured", "met"], rows)


# The tables of one machine's result set, by name.
_PER_MACHINE: dict[str, Callable[[pathlib.Path], str]] = {
    "step-time": step_time_variants,
    "step-time-ratios": step_time_ratios,
    "scaling": scaling,
    "scaling-flat": scaling_flat,
    "breakdown": lambda results: breakdown_table(_load(results, "breakdown")),
    "profile": lambda results: profile_table(_load(results, "profile")),
    "gemm": lambda results: gemm_table(_load(results, "gemm")),
    "remat": remat,
    "first-step": first_step,
}
# Those of results/ itself, then each other machine's as "<name>-<suffix>".
TABLES: dict[str, Callable[[pathlib.Path], str]] = {
    "targets": targets_table,
    "memory": memory,
    "qlora": qlora,
    "gpu": gpu,
    **_PER_MACHINE,
    **{f"{name}-{suffix}": (lambda results, table=table, d=d: table(results / d))
       for suffix, d in OTHER_CPUS.items() for name, table in _PER_MACHINE.items()},
}


def render(text: str, results: pathlib.Path) -> str:
  """``text`` with every marked table rendered afresh from ``results``.

  Raises:
    KeyError: a marker names a table this module does not render.
  """
  def replace(m: re.Match) -> str:
    name = m.group(2)
    if name not in TABLES:
      raise KeyError(f"<!-- table: {name} --> names no table; known: {', '.join(TABLES)}")
    try:
      table = TABLES[name](results)
    except FileNotFoundError as e:  # a benchmark not run yet
      table = f"_Not measured yet: no `{pathlib.Path(e.filename).name}`._"
    return m.group(1) + table.rstrip() + "\n" + m.group(4)
  return _BLOCK.sub(replace, text)


def names_in(text: str) -> list[str]:
  return [m.group(2) for m in _BLOCK.finditer(text)]


def main(argv: list[str]) -> int:
  check = "--check" in argv[1:]
  results = ROOT / "benchmarks" / "results"
  stale = []
  for path in READMES:
    old = path.read_text(encoding="utf-8")
    new = render(old, results)
    if new != old:
      stale.append(str(path))
      if not check:
        path.write_text(new, encoding="utf-8")
  verb = "differ from the results in" if check else "rewritten:"
  print(f"tables {verb} {', '.join(stale)}" if stale else "tables match the results")
  return 1 if (check and stale) else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
