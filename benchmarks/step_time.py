r"""Training step time of LoRA variants, side by side in one process.

    python benchmarks/step_time.py                      # DESIGN.md §4's model
    python benchmarks/step_time.py --d_model=128 --rounds=5   # a quick look

Trains the same transformer LM (benchmarks/lm.py) as: dense full fine-tuning,
the bound (forward + input gradients, no weight gradients), hand-written Haiku
LoRA, xrapture on the unmodified model, and HuggingFace PEFT LoRA in torch;
alternating one step of each per round and reporting medians over rounds of
paired ratios. Then: jit compile time of xrapture against the hand-written
LoRA step, and inference with merged parameters against the base model.
Writes benchmarks/results/step_time.json and .md.
"""

import os
import re
import sys
import time

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import numpy as np

import xrapture

from benchmarks import lm
from benchmarks import report
from benchmarks import sizes
from benchmarks import targets
from benchmarks import timing
from benchmarks import variants

_COMPILE_REPS = flags.DEFINE_integer("compile_reps", 3, "Compile-time repetitions.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", None,
                                    "torch device for PEFT; default cuda when JAX runs on a GPU.")

# Ratios reported: (numerator, denominator, target or None).
RATIOS = (
    ("xrapture", "bound", targets.STEP_OVER_BOUND),
    ("xrapture", "naive", targets.STEP_OVER_NAIVE),
    ("xrapture", "peft", targets.STEP_OVER_PEFT),
    ("xrapture", "full", None),
    ("naive", "bound", None),
    ("peft", "bound", None),
    ("full", "bound", None),
    ("naive", "peft", None),
)


def build(cfg: lm.Config, with_peft: bool, torch_device: str = "cpu"):
  """Base params, adapted params, and every variant, keyed by name."""
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  adapted = variants.adapted_params(cfg, base)
  steps = {
      "full": variants.full(cfg, base, batch),
      "bound": variants.bound(cfg, base, batch),
      "naive": variants.naive(cfg, adapted, batch),
      "xrapture": variants.xrapture_variant(cfg, base, adapted, batch),
  }
  if with_peft:
    steps["peft"] = variants.PeftVariant(cfg, batch, threads=timing.cpu_threads(),
                                         device=torch_device, base=base, adapted=adapted)
  return base, adapted, batch, steps


def hlo_stats(compiled) -> dict[str, float]:
  """Dot/convolution count and XLA's flop estimate of a compiled step."""
  text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"dots": len(re.findall(r"\bdot\(", text)),
          "convolutions": len(re.findall(r"\bconvolution\(", text)),
          "gflops": float((cost or {}).get("flops", float("nan"))) / 1e9}


def compile_times(steps, names, reps):
  """Seconds to trace + lower, and to compile, a fresh jit; alternated, caches cleared."""
  out = {name: {"lower_s": [], "compile_s": []} for name in names}
  stats = {}
  for r in range(reps):
    for name in names[r % len(names):] + names[:r % len(names)]:
      jax.clear_caches()
      start = time.perf_counter()
      lowered = steps[name].lower()
      mid = time.perf_counter()
      compiled = lowered.compile()
      end = time.perf_counter()
      out[name]["lower_s"].append(mid - start)
      out[name]["compile_s"].append(end - mid)
      stats[name] = hlo_stats(compiled)
  for name in names:
    out[name]["total_s"] = [a + b for a, b in zip(out[name]["lower_s"], out[name]["compile_s"])]
  return out, stats


def inference_steps(cfg, base, adapted, batch):
  """Forward passes: base params, merged params, and unmerged LoraWeights."""
  tokens = batch[0]
  forward = jax.jit(lambda p, t: lm.dense_model(cfg).apply(p, None, t))
  model = xrapture.transform(lambda t: lm.forward(t, cfg=cfg), variants.lora_config(cfg))
  forward_lora = jax.jit(lambda p, t: model.apply(p, None, t))
  merged = xrapture.merge_params(adapted)
  run = lambda f, p: (lambda: jax.block_until_ready(f(p, tokens)))
  return {"base": run(forward, base), "merged": run(forward, merged),
          "unmerged": run(forward_lora, adapted)}


def run(cfg: lm.Config, rounds: int, warmup: int, compile_reps: int,
        with_peft: bool, torch_device: str | None = None) -> dict:
  """Every measurement of this script; returns the results dict."""
  env = timing.environment()
  if torch_device is None:
    torch_device = variants.default_torch_device()
  env["torch_device"] = torch_device if with_peft else None
  env["torch_threads"] = timing.cpu_threads() if with_peft else None
  base, adapted, batch, steps = build(cfg, with_peft, torch_device)

  # Same losses first: the variants must train the same model the same way.
  losses = {name: [] for name in steps}
  for _ in range(3):
    for name, variant in steps.items():
      losses[name].append(float(variant.step()))
  agreement = variants.check_agreement(
      losses, [["xrapture", "naive", "peft"]])
  agreement["full_vs_bound_first_step_rel"] = abs(
      losses["full"][0] - losses["bound"][0]) / abs(losses["bound"][0])

  times = timing.alternate({n: v.step for n, v in steps.items()}, rounds, warmup)
  # Also the ratio of each variant's fastest step: on a shared machine the
  # fastest step is the least disturbed one (torch's OpenMP barriers suffer
  # far more from a stolen core than XLA's thread pool).
  ratios = {f"{a}/{b}": dict(timing.paired_ratio(times, a, b), target=t,
                             of_fastest=min(times[a]) / min(times[b]))
            for a, b, t in RATIOS if a in times and b in times}

  jax_names = ["naive", "xrapture", "full", "bound"]
  compiles, stats = compile_times(steps, jax_names, compile_reps)
  compile_ratio = timing.paired_ratio(
      {n: compiles[n]["total_s"] for n in jax_names}, "xrapture", "naive")

  inference = timing.alternate(inference_steps(cfg, base, adapted, batch),
                               max(rounds, 10), warmup)
  env["loadavg_end"] = timing.load_average()
  return {
      "environment": env,
      "config": cfg.__dict__,
      "params": {"base": lm.param_count(base),
                 "trainable": {n: v.trainable for n, v in steps.items()},
                 "opt_state_bytes": {n: v.opt_state_bytes for n, v in steps.items()}},
      "agreement": agreement,
      "step_ms": timing.summarize(times),
      "step_ratios": ratios,
      "compile": {"seconds": {n: {k: float(np.median(v)) for k, v in c.items()}
                              for n, c in compiles.items()},
                  "xrapture/naive": dict(compile_ratio, target=targets.COMPILE_OVER_NAIVE),
                  "hlo": stats},
      "inference_ms": timing.summarize(inference),
      "inference_ratios": {
          "merged/base": dict(timing.paired_ratio(inference, "merged", "base"),
                              target=list(targets.MERGED_OVER_BASE)),
          "unmerged/base": timing.paired_ratio(inference, "unmerged", "base")},
      "raw_seconds": {"step": times, "inference": inference},
  }


def markdown(results: dict) -> str:
  cfg, env = results["config"], results["environment"]
  step, ratios = results["step_ms"], results["step_ratios"]
  lines = [
      f"Model: d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
      f"vocab {cfg['vocab']}, T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']} "
      f"(alpha {cfg['alpha']}) on query/key/value/out/up/down; "
      f"{results['params']['base'] / 1e6:.1f}M base params.",
      "",
      report.environment_line(env) + (
          f" · PEFT on torch {env['torch_device']}, {env['torch_threads']} threads"
          if env.get("torch_device") else ""),
      "",
      "Step time (one training step incl. Adam; median of "
      f"{step['bound']['n']} alternated rounds):",
      "",
  ]
  bound = step["bound"]["median_ms"]
  trainable = results["params"]["trainable"]
  opt_bytes = results["params"]["opt_state_bytes"]
  descr = {"full": "dense full fine-tune", "bound": "bound: fwd + input grads",
           "naive": "hand-written Haiku LoRA", "xrapture": "xrapture (unmodified model)",
           "peft": "HF PEFT LoRA (torch)"}
  rows = []
  for name in ("full", "bound", "naive", "xrapture", "peft"):
    if name not in step:
      continue
    s = step[name]
    rows.append([descr[name], f"{s['median_ms']:.1f}",
                 f"{s['q1_ms']:.1f}–{s['q3_ms']:.1f}", s["median_ms"] / bound,
                 f"{trainable[name]:,}", f"{opt_bytes[name]:,}"])
  lines.append(report.markdown_table(
      ["variant", "median ms", "IQR ms", "÷ bound (of medians)", "trainable",
       "optimizer state bytes"], rows))
  lines += ["", "Paired ratios (median over rounds of the two steps timed back to back):", ""]
  rows = [[k, v["median"], f"{v['q1']:.3g}–{v['q3']:.3g}", v["of_fastest"],
           "" if v["target"] is None else f"≤ {v['target']}",
           report.met(v["median"], v["target"])] for k, v in ratios.items()]
  comp = results["compile"]
  c = comp["xrapture/naive"]
  rows.append(["compile: xrapture/naive", c["median"], f"{c['q1']:.3g}–{c['q3']:.3g}", "",
               f"≤ {c['target']}", report.met(c["median"], c["target"])])
  for key, v in results["inference_ratios"].items():
    target = v.get("target")
    rows.append([f"inference: {key}", v["median"], f"{v['q1']:.3g}–{v['q3']:.3g}", "",
                 "" if target is None else "1.00 ± 0.03", report.met(v["median"], target)])
  lines.append(report.markdown_table(
      ["ratio", "median", "IQR", "of fastest steps", "target", "met (median)"], rows))
  lines += ["", "jit compile (trace + lower + compile, median seconds; dots and XLA "
            "GFLOP of the compiled step):", ""]
  rows = [[n, s["lower_s"], s["compile_s"], s["total_s"], comp["hlo"][n]["dots"],
           comp["hlo"][n]["gflops"]] for n, s in comp["seconds"].items()]
  lines.append(report.markdown_table(
      ["step", "trace+lower s", "compile s", "total s", "dots", "GFLOP"], rows))
  inf = results["inference_ms"]
  lines += ["", "Inference (forward only, median ms): " + ", ".join(
      f"{k} {v['median_ms']:.1f}" for k, v in inf.items()) + "."]
  agree = results["agreement"]
  lines += ["", "Agreement: LoRA variants' losses over 3 steps " + (
      "agree" if agree["ok"] else "**disagree**") + f" (rtol {agree['rtol']}: " + ", ".join(
          f"{k} {v:.1e}" for k, v in agree.items() if k.endswith("_max_rel")) + ")."]
  return "\n".join(lines)


def main(argv):
  sizes.start(argv)
  results = run(sizes.config(), sizes.ROUNDS.value, sizes.WARMUP.value,
                _COMPILE_REPS.value, sizes.PEFT.value, _TORCH_DEVICE.value)
  text = markdown(results)
  report.publish(sizes.OUT.value, "step_time", results, text)


if __name__ == "__main__":
  app.run(main)
