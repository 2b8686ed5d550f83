r"""Peak memory of LoRA against full fine-tuning with Adam, one process each.

    python benchmarks/memory.py                 # ~118M fp32 params, B=1 and B=4
    python benchmarks/memory.py --d_model=256 --n_layers=2 --vocab=512   # quick

Each variant trains two steps in its own subprocess (``--child=NAME``), so
that nothing one variant allocated counts against another, once per batch
size (activations grow with the batch, parameters and Adam moments do not:
LoRA's saving is a share of what the parameters take). The parent collects
what each child reports:

* ``max_rss``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the first
  step: the whole process, initialization and XLA's compiler included (on
  CPU, the compiler alone peaks ~300 MiB above the runtime, whatever the
  model size).
* ``step_peak_rss``: the peak over the later, steady-state steps (freed heap
  trimmed and the peak reset through ``/proc/self/clear_refs`` first), net of
  ``baseline_rss``, the
  child's RSS after its imports and one tiny jit (jax; and torch for PEFT).
* ``xla``: the compiled step's ``memory_analysis()`` — arguments + outputs +
  temporaries − aliased (donated) bytes, what XLA itself plans to hold.
* ``device_peak``: ``peak_bytes_in_use`` of the device, where it reports one
  (GPU).
* ``opt_state_bytes``: bytes of the optimizer state.

The ``xrapture_remat`` child is xrapture with every block under ``hk.remat``
with the ``--remat`` policy (memory on demand; its step time against plain
LoRA is benchmarks/remat.py's).

Writes benchmarks/results/memory.json and .md.
"""

import json
import os
import subprocess
import sys

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags

from benchmarks import report
from benchmarks import rss
from benchmarks import sizes

_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Sequences per step (B), one run each.")
_STEPS = flags.DEFINE_integer("steps", 3, "Training steps each child runs (the first compiles).")
_VARIANTS = flags.DEFINE_list("variants", ["full", "xrapture", "xrapture_remat", "naive", "peft"],
                              "Children to run.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one variant and print JSON.")


def run_child(name: str) -> dict:
  """Builds one variant, trains ``--steps`` steps, and measures (in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  from benchmarks import variants  # pylint: disable=g-import-not-at-top
  cfg = sizes.config()
  batch = lm.batch(cfg)
  out = {"variant": name}
  if name == "peft":
    import peft  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    import torch  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(jax.jit(lambda x: x + 1)(np.ones(4, np.float32)))
  out["baseline_rss"] = rss.rss_bytes()
  if name == "peft":  # torch's own init: no JAX copy of the weights in this process
    variant = variants.PeftVariant(
        cfg, batch, threads=len(os.sched_getaffinity(0)),
        device="cuda" if torch.cuda.is_available() else "cpu")
    out["params"] = sum(p.numel() for p in variant.model.parameters())
    out["param_bytes"] = 4 * out["params"]
  else:
    base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
    out["params"] = lm.param_count(base)
    out["param_bytes"] = lm.tree_bytes(base)
    if name == "full":
      variant = variants.full(cfg, base, batch, copy=False)
    else:
      adapted = variants.adapted_params(cfg, base)
      if name == "xrapture":
        variant = variants.xrapture_variant(cfg, base, adapted, batch, copy=False)
      elif name == "xrapture_remat":  # memory on demand: every block under hk.remat
        variant = variants.xrapture_variant(cfg.replace(remat=sizes.REMAT.value), base,
                                            adapted, batch, copy=False, name=name)
      else:
        variant = variants.naive(cfg, adapted, batch, copy=False)
      del adapted
    del base
  losses = [float(variant.step())]  # compiles
  out["max_rss"] = rss.max_rss_bytes()  # the whole process: init, compile, one step
  if rss.reset_peak_rss():
    for _ in range(_STEPS.value - 1):
      losses.append(float(variant.step()))
    out["step_peak_rss"] = rss.max_rss_bytes()  # steady-state training steps only
  out.update(losses=losses, trainable=variant.trainable,
             opt_state_bytes=variant.opt_state_bytes)
  if name == "peft":
    if torch.cuda.is_available():
      out["device_peak"] = torch.cuda.max_memory_allocated()
    return out
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak"] = stats["peak_bytes_in_use"]
  analysis = variant.lower().compile().memory_analysis()
  out["xla"] = {k: int(getattr(analysis, f"{k}_size_in_bytes"))
                for k in ("argument", "output", "temp", "alias")}
  out["xla"]["total"] = (out["xla"]["argument"] + out["xla"]["output"]
                         + out["xla"]["temp"] - out["xla"]["alias"])
  return out


def _spawn(name: str, argv_flags: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={name}"] + argv_flags
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"child {name} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
  env, children = results["environment"], results["children"]
  mib = lambda b: f"{b / 2**20:,.0f}"
  cfg = results["config"]
  first = next(c for c in children.values() if "params" in c)
  lines = [
      f"Model: d={cfg['d_model']}, {cfg['n_layers']} layers, vocab {cfg['vocab']}, "
      f"T={cfg['seq_len']}, B={', '.join(results['batches'])}, r={cfg['rank']}: "
      f"{first['params'] / 1e6:.1f}M fp32 params ({mib(first['param_bytes'])} MiB); "
      f"Adam; {results['steps']} steps per process."
      + (f" xrapture_remat: blocks under hk.remat(policy="
         f"jax.checkpoint_policies.{results['remat_policy']}) (':k': the first k)."
         if any(k.startswith("xrapture_remat") for k in children) else ""),
      "",
      report.environment_line(env),
      "",
  ]
  rows = []
  for name, c in children.items():
    step_net = rss.step_net(c)
    rows.append([name, mib(c["max_rss"]), mib(c["baseline_rss"]),
                 "" if step_net is None else mib(step_net),
                 mib(c["xla"]["total"]) if "xla" in c else "",
                 mib(c["device_peak"]) if "device_peak" in c else "",
                 f"{c['opt_state_bytes']:,}", f"{c['trainable']:,}"])
  lines.append(report.markdown_table(
      ["process", "max RSS MiB (all)", "runtime RSS MiB", "step peak RSS − runtime MiB",
       "XLA step plan MiB", "device peak MiB", "optimizer state bytes", "trainable"], rows))
  lines += ["", "LoRA ÷ full fine-tune at the same B (target ≤ 0.45):", ""]
  rows = [[k, v, "yes" if v <= 0.45 else "**no**"] for k, v in results["ratios"].items()]
  lines.append(report.markdown_table(["measure", "ratio", "met"], rows))
  return "\n".join(lines)


def ratios(children: dict, batches: list[str]) -> dict[str, float]:
  """Each LoRA child against the full fine-tune child of the same batch size."""
  net = rss.step_net
  out = {}
  for b in batches:
    full = children.get(f"full B={b}")
    if not full:
      continue
    for name in ("xrapture", "xrapture_remat", "naive", "peft"):
      c = children.get(f"{name} B={b}")
      if not c:
        continue
      key = f"{name} B={b}"
      out[f"{key}: max RSS (whole process)"] = c["max_rss"] / full["max_rss"]
      if "step_peak_rss" in c and "step_peak_rss" in full:
        out[f"{key}: step peak RSS − runtime"] = net(c) / net(full)
      if "xla" in c:
        out[f"{key}: XLA step bytes"] = c["xla"]["total"] / full["xla"]["total"]
      if "device_peak" in c and "device_peak" in full:
        out[f"{key}: device peak"] = c["device_peak"] / full["device_peak"]
      out[f"{key}: optimizer state"] = c["opt_state_bytes"] / full["opt_state_bytes"]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if _CHILD.value:
    print(json.dumps(run_child(_CHILD.value)))
    return
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  env = timing.environment()
  passthrough = [f"--{f}={flags.FLAGS[f].value}" for f in
                 ("d_model", "n_layers", "head_dim", "vocab", "seq_len", "rank", "steps",
                  "remat")]
  children = {}
  for b in _BATCHES.value:
    for name in _VARIANTS.value:
      if name == "peft":
        try:
          import peft  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
        except ImportError:
          continue
      key = f"{name} B={b}"
      children[key] = _spawn(name, passthrough + [f"--batch={b}"])
      print(key, {k: v for k, v in children[key].items() if k != "losses"}, flush=True)
  env["loadavg_end"] = timing.load_average()
  results = {"environment": env, "config": sizes.config().__dict__, "steps": _STEPS.value,
             "remat_policy": sizes.REMAT.value,
             "batches": list(_BATCHES.value), "children": children,
             "ratios": ratios(children, _BATCHES.value)}
  text = markdown(results)
  report.publish(sizes.OUT.value, "memory", results, text)


if __name__ == "__main__":
  for _name, _default in (("d_model", 1024), ("n_layers", 8), ("vocab", 8192)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
