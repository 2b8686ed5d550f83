r"""Memory on demand: LoRA with each block under ``hk.remat``, against plain LoRA.

    python benchmarks/remat.py            # 117.7M params (d=1024, 8 layers), B=4
    python benchmarks/remat.py --d_model=256 --n_layers=2 --vocab=512 --rounds=3   # quick

The benchmark LM (benchmarks/lm.py) with LoRA r=8 on query/key/value/out/up/
down, trained through xrapture's public API as a user writes it, once as it
is and once per ``--policies`` entry with every block wrapped in
``hk.remat(block, policy=jax.checkpoint_policies.<policy>)``: xrapture keeps
the policy, so the user's choice decides what the backward pass recomputes.
Side by side in one process, steps alternated, it reports:

* the step time of each remat variant ÷ plain LoRA's (paired per round;
  target ≤ 1.25 for the policy the README recommends);
* what XLA plans to hold for one step (arguments + outputs + temporaries −
  donated; ``memory_analysis()`` of the compiled step), ÷ full fine-tuning's
  with Adam (target ≤ 0.45). Peak RSS of the same variants, one process each,
  is ``benchmarks/memory.py``'s ``xrapture_remat`` row.

Writes benchmarks/results/remat.json and .md.
"""

import os
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

_POLICIES = flags.DEFINE_list(
    "policies", ["dots_with_no_batch_dims_saveable", "dots_saveable", "nothing_saveable"],
    "jax.checkpoint_policies names, one remat variant each ('policy:k': the first k "
    "blocks only).")

STEP_TARGET = targets.REMAT_STEP_OVER_LORA
MEMORY_TARGET = targets.MEMORY_OVER_FULL


def plan_bytes(variant) -> int:
  """What XLA plans to hold for one compiled step."""
  a = variant.lower().compile().memory_analysis()
  return int(a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
             - a.alias_size_in_bytes)


def run(cfg: lm.Config, policies: list[str], rounds: int, warmup: int) -> dict:
  env = timing.environment()
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  adapted = variants.adapted_params(cfg, base)
  plans = {"full": plan_bytes(variants.full(cfg, base, batch))}
  steps = {"lora": variants.xrapture_variant(cfg, base, adapted, batch)}
  for policy in policies:
    steps[policy] = variants.xrapture_variant(cfg.replace(remat=policy), base, adapted,
                                              batch, name=policy)
  losses = {name: [float(v.step()) for _ in range(2)] for name, v in steps.items()}
  plans.update({name: plan_bytes(v) for name, v in steps.items()})
  times = timing.alternate({n: v.step for n, v in steps.items()}, rounds, warmup)
  env["loadavg_end"] = timing.load_average()
  return {
      "environment": env, "config": cfg.__dict__, "base_params": lm.param_count(base),
      "losses": losses, "plan_bytes": plans, "step_ms": timing.summarize(times),
      "step_ratios": {p: timing.paired_ratio(times, p, "lora") for p in policies},
      "raw_seconds": times,
  }


def markdown(results: dict) -> str:
  cfg, plans, step = results["config"], results["plan_bytes"], results["step_ms"]
  mib = lambda b: f"{b / 2**20:,.0f}"
  rows = [["full fine-tune (Adam)", "", mib(plans["full"]), 1.0, "", "", ""]]
  for name in ["lora", *results["step_ratios"]]:
    ratio = results["step_ratios"].get(name)
    mem = plans[name] / plans["full"]
    rows.append([
        "LoRA, every activation kept" if name == "lora" else f"LoRA, remat `{name}`",
        f"{step[name]['median_ms']:.0f}", mib(plans[name]), mem,
        "1" if ratio is None else f"{ratio['median']:.3g} ({ratio['q1']:.3g}–{ratio['q3']:.3g})",
        "yes" if mem <= MEMORY_TARGET else "**no**",
        "" if ratio is None else ("yes" if ratio["median"] <= STEP_TARGET else "**no**")])
  spread = max(max(v) - min(v) for v in zip(*results["losses"].values()))
  return "\n".join([
      f"Model: d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
      f"vocab {cfg['vocab']}, T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']} "
      f"on query/key/value/out/up/down; {results['base_params'] / 1e6:.1f}M fp32 base "
      "params; Adam.",
      "",
      report.environment_line(results["environment"]),
      "",
      report.markdown_table(
          ["variant", "step ms (median)", "XLA step plan MiB", "plan ÷ full",
           "step ÷ plain LoRA (IQR)", f"plan ≤ {MEMORY_TARGET}× full",
           f"step ≤ {STEP_TARGET}×"], rows),
      "",
      f"The variants' losses over their first two steps differ by at most {spread:.1e}.",
  ])


def main(argv):
  sizes.start(argv)
  cfg = sizes.config()
  results = run(cfg, list(_POLICIES.value), sizes.ROUNDS.value, sizes.WARMUP.value)
  report.publish(sizes.OUT.value, "remat", results, markdown(results))


if __name__ == "__main__":
  for _name, _default in (("d_model", 1024), ("n_layers", 8), ("vocab", 8192),
                          ("rounds", 7), ("warmup", 1)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
