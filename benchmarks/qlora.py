r"""QLoRA against LoRA on a float32 base and full fine-tuning: memory, step time, error.

    python benchmarks/qlora.py          # ~306M fp32 params (d=2048, 6 layers), B=1, T=32
    python benchmarks/qlora.py --d_model=256 --n_layers=1 --vocab=256 --rounds=2   # quick
    python benchmarks/qlora.py --base=<workdir>/base    # error table on pretrained weights

The model is benchmarks/lm.py's transformer, adapters of rank ``--rank`` on
query/key/value/out/up/down. QLoRA quantizes its whole base
(``xrapture.quantize``: the adapted kernels, and with ``quantize_frozen`` the
unembedding and the embedding table), block 64. Each part runs in its own
subprocess (``--part=NAME``), so that nothing one variant allocated counts
against another:

* **memory**, one process per variant (full fine-tuning with Adam, LoRA on
  the float32 base, QLoRA NF4, NF4 + double quantization, int8):
  ``--memory_steps`` training steps; ``step peak RSS − runtime`` is the peak resident memory
  over the steady-state steps (peak reset after the first, compiling, step)
  net of the process's RSS after its imports (as memory.py measures), and
  ``XLA plan`` the compiled step's arguments + outputs + temporaries −
  donated bytes.
* **step time**, one process alternating LoRA and QLoRA steps for
  ``--rounds`` rounds; the ratio is the median over rounds of paired ratios.
* **quantization error** of every kernel of real weights: ``--base`` (a
  directory or ``base.safetensors`` written by experiments/pretrain.py), or
  the model initialized here: RMS of ``dequantize(q) − w`` over RMS of ``w``,
  the largest ``|dequantize(q) − w|``, and bits per parameter.

Writes benchmarks/results/qlora.json and .md.
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

# Names distinct from memory.py's flags, which live in the same absl registry
# when both modules are imported (the smoke test).
_STEPS = flags.DEFINE_integer("memory_steps", 3,
                              "Training steps per memory process (the first compiles).")
_VARIANTS = flags.DEFINE_list(
    "memory_variants", ["full", "lora", "qlora-nf4", "qlora-nf4-dq", "qlora-int8"],
    "Memory processes to run.")
_TIMED = flags.DEFINE_list("timed", ["lora", "qlora-nf4"],
                           "Variants alternated in the step-time process (the first is the "
                           "denominator).")
_BASE = flags.DEFINE_string("base", "", "Pretrained weights for the error table: a directory "
                            "holding base.safetensors, or the file; '' = the model initialized "
                            "here.")
_BLOCK = flags.DEFINE_integer("block", 64, "NF4 block size.")
_PART = flags.DEFINE_string("part", None, "Internal: run one part (a variant's memory, "
                            "'timing' or 'errors') and print JSON.")

# Variant -> (scheme, double_quant); None: the float32 base.
QUANTIZED = {"qlora-nf4": ("nf4", False), "qlora-nf4-dq": ("nf4", True),
             "qlora-int8": ("int8", False)}
TARGETS = {"memory vs LoRA": 0.35, "memory vs full fine-tune": 0.15, "step time vs LoRA": 1.5}


def _build(name, cfg, base, batch):
  """The variant ``name``'s training step on ``base`` (whose buffers it may take)."""
  from benchmarks import variants  # pylint: disable=g-import-not-at-top
  if name == "full":
    return variants.full(cfg, base, batch, copy=False)
  adapted = variants.adapted_params(cfg, base)
  if name == "lora":
    return variants.xrapture_variant(cfg, base, adapted, batch, copy=False)
  scheme, double_quant = QUANTIZED[name]
  quantized = variants.quantized_params(cfg, adapted, scheme, double_quant,
                                        block=_BLOCK.value)
  return variants.qlora_variant(cfg, base, quantized, batch, name)


def memory_child(name: str) -> dict:
  """Builds one variant, trains ``--steps`` steps, and measures (in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  cfg = sizes.config()
  batch = lm.batch(cfg)
  jax.block_until_ready(jax.jit(lambda x: x + 1)(np.ones(4, np.float32)))
  out = {"variant": name, "baseline_rss": rss.rss_bytes()}
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  out["params"] = lm.param_count(base)
  out["fp32_param_bytes"] = lm.tree_bytes(base)
  variant = _build(name, cfg, base, batch)
  del base   # LoRA's and full's params still hold these buffers; QLoRA's do not
  out["param_bytes"] = lm.tree_bytes(variant.state[0])
  losses = [float(variant.step())]  # compiles
  out["max_rss"] = rss.max_rss_bytes()
  if rss.reset_peak_rss():
    for _ in range(_STEPS.value - 1):
      losses.append(float(variant.step()))
    out["step_peak_rss"] = rss.max_rss_bytes()
  out.update(losses=losses, trainable=variant.trainable,
             opt_state_bytes=variant.opt_state_bytes)
  analysis = variant.lower().compile().memory_analysis()
  out["xla"] = {k: int(getattr(analysis, f"{k}_size_in_bytes"))
                for k in ("argument", "output", "temp", "alias")}
  out["xla"]["total"] = (out["xla"]["argument"] + out["xla"]["output"]
                         + out["xla"]["temp"] - out["xla"]["alias"])
  return out


def timing_child() -> dict:
  """The variants ``--timed`` alternated step by step in this one process."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  cfg = sizes.config()
  batch = lm.batch(cfg)
  init = jax.jit(lm.dense_model(cfg).init)
  built = {name: _build(name, cfg, init(jax.random.PRNGKey(0), batch[0]), batch)
           for name in _TIMED.value}
  losses = {name: float(v.step()) for name, v in built.items()}  # compiles
  times = timing.alternate({name: v.step for name, v in built.items()},
                           sizes.ROUNDS.value, sizes.WARMUP.value)
  first = _TIMED.value[0]
  return {"first_loss": losses, "steps": timing.summarize(times),
          "ratios": {f"{name} / {first}": timing.paired_ratio(times, name, first)
                     for name in _TIMED.value[1:]}}


def _kernels(path: str):
  """``(name, array)`` of the kernels of ``path``'s weights or of the model here; its source."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if path:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    file = os.path.join(path, "base.safetensors") if os.path.isdir(path) else path
    tensors = safetensors.numpy.load_file(file)
    source = f"pretrained weights {file}"
  else:
    from benchmarks import lm  # pylint: disable=g-import-not-at-top
    cfg = sizes.config()
    params = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), lm.batch(cfg)[0])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    tensors = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in flat}
    source = "the benchmark's model initialized here (not trained)"
  # Kernels and token embeddings; not a layer stack's [L, D] vectors, not positions.
  kernels = [(k, v) for k, v in sorted(tensors.items())
             if v.ndim >= 2 and v.dtype.kind == "f" and "pos_embed" not in k
             and (k.endswith("/w") or k.endswith("/embeddings"))]
  return kernels, source


def error_child() -> dict:
  """Quantization error of every kernel, per kind, and over all of them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import xrapture  # pylint: disable=g-import-not-at-top
  kernels, source = _kernels(_BASE.value)
  kinds = {"nf4": dict(scheme="nf4"), "nf4+dq": dict(scheme="nf4", double_quant=True),
           "int8": dict(scheme="int8")}
  totals = {k: dict(err2=0.0, w2=0.0, max_abs=0.0, bytes=0, params=0, skipped=[])
            for k in kinds}
  per_kernel = {}
  for name, w in kernels:
    axis = -1 if "embeddings" in name else -2
    w64 = w.astype(np.float64)
    per_kernel[name] = {"shape": list(w.shape)}
    for kind, kwargs in kinds.items():
      t = totals[kind]
      try:
        q = xrapture.quantize_array(w, block_size=_BLOCK.value, axis=axis, **kwargs)
      except ValueError as e:
        t["skipped"].append(f"{name}: {e}")
        continue
      err = np.asarray(xrapture.dequantize(q), np.float64) - w64
      t["err2"] += float(np.sum(err ** 2))
      t["w2"] += float(np.sum(w64 ** 2))
      t["max_abs"] = max(t["max_abs"], float(np.abs(err).max()))
      t["bytes"] += sum(np.asarray(x).nbytes for x in [q.codes, q.absmax, q.absmax2, q.offset]
                        if x is not None)
      t["params"] += w.size
      per_kernel[name][kind] = float(np.sqrt(np.sum(err ** 2) / np.sum(w64 ** 2)))
  summary = {k: {"relative_rms": float(np.sqrt(t["err2"] / t["w2"])) if t["w2"] else None,
                 "max_abs": t["max_abs"],
                 "bits_per_param": 8 * t["bytes"] / t["params"] if t["params"] else None,
                 "params": t["params"], "skipped": t["skipped"]}
             for k, t in totals.items()}
  return {"source": source, "block": _BLOCK.value, "kinds": summary, "kernels": per_kernel}


def _spawn(args: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(memory: dict, time: dict | None) -> dict[str, dict]:
  """Each QLoRA variant against LoRA and full fine-tuning, with its target."""
  net = rss.step_net
  out = {}
  for name in QUANTIZED:
    c = memory.get(name)
    if not c:
      continue
    for other, target in (("lora", TARGETS["memory vs LoRA"]),
                          ("full", TARGETS["memory vs full fine-tune"])):
      o = memory.get(other)
      if not o:
        continue
      if net(c) is not None and net(o):
        out[f"{name} / {other}: step peak RSS − runtime"] = dict(
            ratio=net(c) / net(o), target=target)
      out[f"{name} / {other}: XLA step plan"] = dict(
          ratio=c["xla"]["total"] / o["xla"]["total"], target=target)
  for key, r in (time or {}).get("ratios", {}).items():
    out[f"{key}: step time (median of paired ratios)"] = dict(
        ratio=r["median"], q1=r["q1"], q3=r["q3"], target=TARGETS["step time vs LoRA"])
  for r in out.values():
    r["met"] = r["ratio"] <= r["target"]
  return out


def markdown(results: dict) -> str:
  cfg, memory = results["config"], results["memory"]
  mib = lambda b: f"{b / 2**20:,.0f}"
  first = next(iter(memory.values()), {})
  lines = [
      f"Model: benchmarks/lm.py transformer, d={cfg['d_model']}, {cfg['n_layers']} layers, "
      f"vocab {cfg['vocab']}, T={cfg['seq_len']}, B={cfg['batch']}, LoRA r={cfg['rank']} on "
      "query/key/value/out/up/down"
      + (f": {first['params'] / 1e6:.1f}M parameters "
         f"({mib(first['fp32_param_bytes'])} MiB in float32)" if first else "")
      + f"; Adam; NF4/int8 block {results['block']}, whole base quantized.",
      "", report.environment_line(results["environment"]), ""]
  if memory:
    rows = []
    for name, c in memory.items():
      net = rss.step_net(c)
      rows.append([name, mib(c["param_bytes"]), "" if net is None else mib(net),
                   mib(c["xla"]["total"]), mib(c["max_rss"]), f"{c['opt_state_bytes']:,}",
                   f"{c['trainable']:,}", f"{c['losses'][0]:.4f}"])
    lines += ["Training-step memory, one process per variant:", "", report.markdown_table(
        ["variant", "params MiB", "step peak RSS − runtime MiB", "XLA step plan MiB",
         "max RSS MiB (all)", "optimizer state bytes", "trainable", "first loss"], rows), ""]
  time = results.get("time")
  if time:
    rows = [[name, f"{s['median_ms']:.0f}", f"{s['q1_ms']:.0f}–{s['q3_ms']:.0f}", s["n"]]
            for name, s in time["steps"].items()]
    lines += ["Step time, alternated in one process:", "", report.markdown_table(
        ["variant", "median ms", "quartiles ms", "rounds"], rows), ""]
  if results["ratios"]:
    rows = [[k, f"{r['ratio']:.3f}", f"≤ {r['target']}", "yes" if r["met"] else "**no**"]
            for k, r in results["ratios"].items()]
    lines += ["Ratios against the targets:", "", report.markdown_table(
        ["measure", "ratio", "target", "met"], rows), ""]
  errors = results.get("errors")
  if errors:
    rows = [[k, f"{v['relative_rms']:.4f}" if v["relative_rms"] is not None else "",
             f"{v['max_abs']:.4g}", f"{v['bits_per_param']:.3f}" if v["bits_per_param"] else "",
             f"{v['params']:,}", len(v["skipped"])]
            for k, v in errors["kinds"].items()]
    lines += [f"Quantization error over every kernel of {errors['source']}:", "",
              report.markdown_table(["kind", "RMS(deq − w) / RMS(w)", "max |deq − w|",
                                     "bits / param", "params", "kernels skipped"], rows)]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if _PART.value:
    if _PART.value == "timing":
      out = timing_child()
    elif _PART.value == "errors":
      out = error_child()
    else:
      out = memory_child(_PART.value)
    print(json.dumps(out))
    return
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  env = timing.environment()
  passthrough = [f"--{f}={flags.FLAGS[f].value}" for f in
                 ("d_model", "n_layers", "head_dim", "vocab", "seq_len", "batch", "rank",
                  "rounds", "warmup", "memory_steps", "block", "base")]
  passthrough.append(f"--timed={','.join(_TIMED.value)}")
  memory = {}
  for name in _VARIANTS.value:
    memory[name] = _spawn([f"--part={name}"] + passthrough)
    print(name, {k: v for k, v in memory[name].items() if k != "losses"}, flush=True)
  time = _spawn(["--part=timing"] + passthrough) if len(_TIMED.value) > 1 else None
  print("time", time, flush=True)
  errors = _spawn(["--part=errors"] + passthrough)
  print("errors", errors["kinds"], flush=True)
  env["loadavg_end"] = timing.load_average()
  results = {"environment": env, "config": sizes.config().__dict__, "block": _BLOCK.value,
             "steps": _STEPS.value, "memory": memory, "time": time, "errors": errors,
             "ratios": ratios(memory, time)}
  text = markdown(results)
  report.publish(sizes.OUT.value, "qlora", results, text)


if __name__ == "__main__":
  for _name, _default in (("d_model", 2048), ("n_layers", 6), ("vocab", 1024),
                          ("seq_len", 32), ("batch", 1), ("rounds", 5), ("warmup", 1)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
