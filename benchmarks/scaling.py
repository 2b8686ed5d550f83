r"""How the LoRA step grows with width and rank, against full fine-tune and the bound.

    python benchmarks/scaling.py                                  # 256..1024 × 4..64
    python benchmarks/scaling.py --widths=128,256 --ranks=4,16 --rounds=3   # quick

For each width and rank, one round robin of: full fine-tune, the bound,
and xrapture, the hand-written LoRA and HuggingFace PEFT (torch, when
installed) at that rank (benchmarks/lm.py's model, 2 layers, heads of 64).
Reports medians over rounds of each step's time paired with the bound's (and
the full fine-tune's, and PEFT's at the same rank) in the same round, against
issue 15's targets: xrapture ÷ bound ≤ 1 + 3r/d + 0.03 and ÷ PEFT ≤ 0.85.
Writes benchmarks/results/scaling.json, .md and .png.
"""

import importlib.util
import os
import statistics
import sys

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax

from benchmarks import lm
from benchmarks import report
from benchmarks import sizes
from benchmarks import targets
from benchmarks import timing
from benchmarks import variants

_RANKS = flags.DEFINE_list("ranks", ["4", "8", "16", "32", "64"], "LoRA ranks.")
_NAIVE = flags.DEFINE_bool("naive", True, "Also time the hand-written LoRA at every rank.")
_FLAT = flags.DEFINE_bool(
    "flat_optimizer", False,
    "Also time xrapture with its Adam under optax.flatten (the README's CPU tip), in the "
    "same round robin as plain Adam; the READMEs show such a run from "
    "results/<cpu>/scaling_flat.json.")

PEFT_TARGET = targets.SCALING_OVER_PEFT


def _have_peft() -> bool:
  if all(importlib.util.find_spec(m) for m in ("peft", "torch")):
    return True
  print("scaling: no torch/peft here (pip install '.[peft]'): PEFT not timed", flush=True)
  return False


def measure_width(cfg: lm.Config, ranks: list[int], with_naive: bool,
                  rounds: int, warmup: int, with_peft: bool = False,
                  flat_optimizer: bool = False) -> dict:
  """One round robin per rank: full, the bound, and that rank's LoRA variants.

  A robin per rank keeps the live variants few, as in a user's process: with
  one robin of all 17 variants, xrapture ÷ bound at d=512 read up to 0.15
  higher than in a robin of its own rank (results/scaling_one_robin.json
  against scaling.json, jax 0.12.1).
  """
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  shared = {"full": variants.full(cfg, base, batch).step,
            "bound": variants.bound(cfg, base, batch).step}
  times = {name: [] for name in shared}
  out = {"points": []}
  for rank in ranks:
    rcfg = cfg.replace(rank=rank, alpha=2.0 * rank)
    adapted = variants.adapted_params(rcfg, base)
    steps = dict(shared, xrapture=variants.xrapture_variant(rcfg, base, adapted, batch).step)
    if flat_optimizer:
      steps["xrapture_flat"] = variants.xrapture_variant(
          rcfg, base, adapted, batch, flat_optimizer=True).step
    if with_naive:
      steps["naive"] = variants.naive(rcfg, adapted, batch).step
    if with_peft:
      steps["peft"] = variants.PeftVariant(
          rcfg, batch, threads=timing.cpu_threads(), base=base, adapted=adapted,
          device=variants.default_torch_device()).step
    robin = timing.alternate(steps, rounds, warmup)
    point = {"rank": rank, "bound_target": targets.bound_target(cfg.d_model, rank)}
    for kind in ("xrapture", "xrapture_flat", "naive", "peft"):
      if kind in robin:
        point[kind] = {"ms": 1e3 * timing.quartiles(robin[kind])[1],
                       "bound": timing.paired_ratio(robin, kind, "bound")["median"],
                       "full": timing.paired_ratio(robin, kind, "full")["median"]}
        times[f"{kind}_r{rank}"] = robin[kind]
    if "xrapture_flat" in robin:
      point["flat_over_plain"] = timing.paired_ratio(robin, "xrapture_flat", "xrapture")["median"]
    if "peft" in robin:
      point["xrapture_over_peft"] = timing.paired_ratio(robin, "xrapture", "peft")["median"]
    point["full_over_bound"] = timing.paired_ratio(robin, "full", "bound")["median"]
    for name in shared:
      times[name] += robin[name]
    out["points"].append(point)
    del steps, robin
  out["step_ms"] = timing.summarize(times)
  out["full_over_bound"] = statistics.median(p["full_over_bound"] for p in out["points"])
  return out


def markdown(results: dict) -> str:
  lines = [f"Transformer LM, {results['n_layers']} layers, T={results['seq_len']}, "
           f"B={results['batch']}, vocab {results['vocab']}; LoRA on q/k/v/out/up/down; "
           f"medians of {results['rounds']} alternated rounds, ratios paired per round. "
           "Targets: xrapture ÷ bound ≤ 1 + 3r/d + 0.03 (the rank-r FLOPs over the "
           f"bound's, plus 0.03); xrapture ÷ PEFT ≤ {PEFT_TARGET}.",
           "", report.environment_line(results["environment"]), ""]
  flat = any("xrapture_flat" in p for w in results["widths"].values() for p in w["points"])
  rows = []
  for width, w in sorted(results["widths"].items(), key=lambda kv: int(kv[0])):
    ms = w["step_ms"]
    for p in w["points"]:
      x, n = p["xrapture"], p.get("naive")
      target = targets.point_target(int(width), p)
      over_peft = p.get("xrapture_over_peft")
      rows.append([width, p["rank"], f"{ms['full']['median_ms']:.1f}",
                   f"{ms['bound']['median_ms']:.1f}", f"{x['ms']:.1f}", x["bound"],
                   f"{target:.3f}", report.met(x["bound"], target), x["full"],
                   "" if n is None else n["bound"],
                   "" if "peft" not in p else f"{p['peft']['ms']:.1f}",
                   "" if over_peft is None else over_peft,
                   "" if over_peft is None else report.met(over_peft, PEFT_TARGET)])
      if flat:
        f = p["xrapture_flat"]["bound"]
        rows[-1] += [f, report.met(f, target), p["flat_over_plain"]]
  lines.append(report.markdown_table(
      ["d", "r", "full ms", "bound ms", "xrapture ms", "xrapture ÷ bound", "target",
       "met", "xrapture ÷ full", "hand-written ÷ bound", "PEFT ms", "xrapture ÷ PEFT",
       "met"] + (["optax.flatten ÷ bound", "met", "optax.flatten ÷ plain Adam"]
                 if flat else []), rows))
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  widths = sorted(int(w) for w in results["widths"])
  ranks = [p["rank"] for p in next(iter(results["widths"].values()))["points"]]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, rank in enumerate(ranks):
    color = plt.cm.viridis(i / max(1, len(ranks) - 1))
    pts = [results["widths"][str(w)]["points"][i] for w in widths]
    left.plot(widths, [p["xrapture"]["bound"] for p in pts], "o-", color=color,
              label=f"xrapture r={rank}")
    if "naive" in pts[0]:
      left.plot(widths, [p["naive"]["bound"] for p in pts], "x--", color=color, alpha=0.6,
                label=f"hand-written r={rank}")
  left.plot(widths, [results["widths"][str(w)]["full_over_bound"] for w in widths], "s:",
            color="black", label="full fine-tune")
  left.axhline(1.0, color="gray", lw=0.8)
  for i, rank in enumerate(ranks):
    left.plot(widths, [targets.bound_target(w, rank) for w in widths], ":", lw=0.8,
              color=plt.cm.viridis(i / max(1, len(ranks) - 1)))
  left.set(xlabel="model width d", ylabel="step time ÷ bound (paired median)",
           title="LoRA step against the bound", xticks=widths)
  left.legend(fontsize=7, ncol=2)
  for w in widths:
    pts = results["widths"][str(w)]["points"]
    right.plot(ranks, [p["xrapture"]["full"] for p in pts], "o-", label=f"d={w}")
  right.axhline(1.0, color="gray", lw=0.8)
  right.set(xlabel="LoRA rank r", ylabel="xrapture step ÷ full fine-tune step",
            title="LoRA step against full fine-tuning", xscale="log", xticks=ranks)
  right.minorticks_off()
  right.set_xticklabels([str(r) for r in ranks])
  right.legend(fontsize=8)
  env = results["environment"]
  fig.suptitle(f"{env['machine']} · {env['backend']} · jax {env['jax']} · {env['date'][:10]}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  sizes.start(argv)
  env = timing.environment()
  ranks = [int(r) for r in _RANKS.value]
  with_peft = sizes.PEFT.value and _have_peft()
  results = {"environment": env, "n_layers": sizes.N_LAYERS.value, "seq_len": sizes.SEQ_LEN.value,
             "batch": sizes.BATCH.value, "vocab": sizes.VOCAB.value, "rounds": sizes.ROUNDS.value,
             "widths": {}}
  for width in (int(w) for w in sizes.WIDTHS.value):
    cfg = sizes.config(d_model=width)
    results["widths"][str(width)] = measure_width(cfg, ranks, _NAIVE.value,
                                                  sizes.ROUNDS.value, sizes.WARMUP.value,
                                                  with_peft, _FLAT.value)
    print(f"d={width} done, load {timing.load_average()}", flush=True)
    jax.clear_caches()
  env["loadavg_end"] = timing.load_average()
  text = markdown(results)
  json_path, _ = report.publish(sizes.OUT.value, "scaling", results, text)
  png = os.path.splitext(json_path)[0] + ".png"
  plot(results, png)
  print("wrote", png)


if __name__ == "__main__":
  for _name, _default in (("rounds", 8), ("warmup", 1)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
