r"""The first training step of a deep model: trace + lower + compile + run.

    python benchmarks/first_step.py                     # 12, 24 and 48 layers, d=256
    python benchmarks/first_step.py --depths=4 --rounds=1   # quick

A user's first step costs more than the steps after it: Python traces the
model, JAX lowers it, XLA compiles it, and only then does it run. The
benchmark LM (benchmarks/lm.py) is built as a plain Python loop over its
blocks (no ``hk.layer_stack``, so every layer is traced and compiled on its
own), and its first LoRA step is timed through xrapture (the unmodified
model, as the README's user writes it) and through the hand-written Haiku
LoRA. Each measurement starts from a fresh jit of a fresh step function with
JAX's caches cleared; the two variants alternate, the order rotating, and the
ratio is the median over rounds of the paired ratios. The phases are timed
separately: tracing (``jit(...).trace``, where xrapture's interpreter runs),
lowering, XLA's compile, and the first execution.

Writes benchmarks/results/first_step.json and .md.
"""

import os
import sys
import time

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

_DEPTHS = flags.DEFINE_list("depths", ["12", "24", "48"], "Numbers of layers.")

TARGET = targets.FIRST_STEP_OVER_NAIVE
PHASES = ("trace", "lower", "compile", "run")
NAMES = ("xrapture", "naive")


def first_step(variant) -> dict[str, float]:
  """Seconds of each phase of a fresh jit's first step (caches cleared)."""
  jax.clear_caches()
  marks = [time.perf_counter()]
  traced = variant.jit().trace(variant.state, variant.consts, variant.batch)
  marks.append(time.perf_counter())
  lowered = traced.lower()
  marks.append(time.perf_counter())
  compiled = lowered.compile()
  marks.append(time.perf_counter())
  variant.state, aux = compiled(variant.state, variant.consts, variant.batch)
  jax.block_until_ready((variant.state, aux))
  marks.append(time.perf_counter())
  seconds = {phase: b - a for phase, a, b in zip(PHASES, marks, marks[1:])}
  seconds["total"] = marks[-1] - marks[0]
  return seconds


def measure_depth(cfg: lm.Config, rounds: int) -> dict:
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  adapted = variants.adapted_params(cfg, base)
  steps = {"xrapture": variants.xrapture_variant(cfg, base, adapted, batch),
           "naive": variants.naive(cfg, adapted, batch)}
  del base, adapted
  runs = {name: [] for name in NAMES}
  for r in range(rounds):
    for name in NAMES[r % 2:] + NAMES[:r % 2]:
      runs[name].append(first_step(steps[name]))
  totals = {name: [run["total"] for run in runs[name]] for name in NAMES}
  return {
      "params": lm.param_count(steps["naive"].consts) + steps["naive"].trainable,
      "seconds": {name: {phase: timing.quartiles([run[phase] for run in runs[name]])[1]
                         for phase in (*PHASES, "total")} for name in NAMES},
      "ratio": dict(timing.paired_ratio(totals, "xrapture", "naive"), target=TARGET),
      "raw_seconds": runs,
  }


def markdown(results: dict) -> str:
  rows = []
  for depth, d in sorted(results["depths"].items(), key=lambda kv: int(kv[0])):
    for name in NAMES:
      s = d["seconds"][name]
      ratio = d["ratio"]
      rows.append([depth, "xrapture" if name == "xrapture" else "hand-written LoRA",
                   *(f"{s[p]:.2f}" for p in (*PHASES, "total")),
                   *((report.median_iqr(ratio), report.met(ratio["median"], TARGET))
                     if name == "xrapture" else ("", ""))])
  cfg = results["config"]
  return "\n".join([
      f"Transformer LM as a Python loop of blocks (no `hk.layer_stack`), d={cfg['d_model']}, "
      f"T={cfg['seq_len']}, B={cfg['batch']}, vocab {cfg['vocab']}, LoRA r={cfg['rank']} on "
      f"query/key/value/out/up/down, Adam; first step of a fresh jit with JAX's caches "
      f"cleared, medians of {results['rounds']} alternated rounds (seconds).",
      "",
      report.environment_line(results["environment"]),
      "",
      report.markdown_table(
          ["layers", "variant", *(f"{p} s" for p in PHASES), "total s",
           "xrapture ÷ hand-written (IQR)", f"≤ {TARGET}"], rows),
  ])


def main(argv):
  sizes.start(argv)
  env = timing.environment()
  results = {"environment": env, "config": sizes.config().__dict__,
             "rounds": sizes.ROUNDS.value, "target": TARGET, "depths": {}}
  for depth in (int(x) for x in _DEPTHS.value):
    cfg = sizes.config().replace(n_layers=depth)
    results["depths"][str(depth)] = measure_depth(cfg, sizes.ROUNDS.value)
    print(f"{depth} layers done, load {timing.load_average()}", flush=True)
  env["loadavg_end"] = timing.load_average()
  report.publish(sizes.OUT.value, "first_step", results, markdown(results))


if __name__ == "__main__":
  for _name, _default in (("d_model", 256), ("rounds", 3)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
