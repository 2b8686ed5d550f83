r"""Per-example adapters in one batch against one adapter and an adapter-by-adapter loop.

    python benchmarks/mixed_batch.py                   # d=256, 2 layers, T=64, 16 adapters
    python benchmarks/mixed_batch.py --adapters=4 --rounds=3   # a quick look

The benchmark LM (benchmarks/lm.py) with LoRA r=8 on query/key/value/out/up/
down serves a batch of ``--adapters`` sequences (one per adapter) three ways,
alternated in one process (inference, jitted, weights as jit arguments):

* ``mixed``: one forward pass, each example with its own adapter
  (``xrapture.mixed_adapter_params`` + ``with_adapter_ids``);
* ``one_adapter``: the same batch, every example on one adapter (LoraWeights);
* ``loop``: adapter by adapter, each example alone with its adapter.

Reports medians over rounds of paired ratios of time per batch; targets:
``one_adapter/mixed`` ≥ 0.7 (mixed keeps ≥ 70% of one adapter's
throughput) and ``loop/mixed`` ≥ 4. Writes benchmarks/results/mixed_batch.json
and .md.
"""

import functools
import os
import sys

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import xrapture

from benchmarks import lm
from benchmarks import report
from benchmarks import sizes
from benchmarks import timing
from benchmarks import variants

_ADAPTERS = flags.DEFINE_integer("adapters", 16, "Adapters, and examples in the batch.")

RATIOS = (("one_adapter", "mixed", 0.7), ("loop", "mixed", 4.0))


def build(cfg: lm.Config, n: int):
  """The adapter set, the batch, and the three variants (and the outputs to compare)."""
  tokens = lm.batch(cfg.replace(batch=n))[0]
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), tokens)
  adapters = xrapture.AdapterSet(base)
  for k in range(n):
    adapters = xrapture.add_adapter(adapters, f"a{k}",
                                    variants.adapted_params(cfg, base, seed=k + 1))
  model = xrapture.transform(functools.partial(lm.forward, cfg=cfg), variants.lora_config(cfg))
  forward = jax.jit(lambda p, t: model.apply(p, None, t))
  forward_mixed = jax.jit(lambda p, ids, t: model.apply(
      xrapture.with_adapter_ids(p, ids), None, t))
  stacked = xrapture.mixed_adapter_params(adapters)
  ids = jnp.arange(n, dtype=jnp.int32)
  per_adapter = [xrapture.adapter_params(adapters, name) for name in adapters.names]
  tokens = jnp.asarray(tokens)
  rows = [tokens[k:k + 1] for k in range(n)]

  def loop():
    return [forward(p, t) for p, t in zip(per_adapter, rows)]

  steps = {
      "mixed": lambda: jax.block_until_ready(forward_mixed(stacked, ids, tokens)),
      "one_adapter": lambda: jax.block_until_ready(forward(per_adapter[0], tokens)),
      "loop": lambda: jax.block_until_ready(loop()),
  }
  outputs = {"mixed": forward_mixed(stacked, ids, tokens),
             "loop": jnp.concatenate(loop(), axis=0)}
  return steps, outputs, lm.param_count(base)


def run(cfg: lm.Config, n: int, rounds: int, warmup: int) -> dict:
  env = timing.environment()
  steps, outputs, base_params = build(cfg, n)
  diff = float(jnp.max(jnp.abs(outputs["mixed"] - outputs["loop"])))
  scale = float(jnp.max(jnp.abs(outputs["loop"])))
  times = timing.alternate(steps, rounds, warmup)
  env["loadavg_end"] = timing.load_average()
  ratios = {f"{a}/{b}": dict(timing.paired_ratio(times, a, b), target=t,
                             of_fastest=min(times[a]) / min(times[b]))
            for a, b, t in RATIOS}
  return {"environment": env, "config": dict(cfg.__dict__, adapters=n),
          "base_params": base_params,
          "agreement": {"max_abs_diff_mixed_vs_loop": diff, "max_abs_logit": scale},
          "batch_ms": timing.summarize(times), "ratios": ratios,
          "raw_seconds": times}


def markdown(results: dict) -> str:
  cfg, env = results["config"], results["environment"]
  n = cfg["adapters"]
  ms = results["batch_ms"]
  lines = [
      f"Model: d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
      f"vocab {cfg['vocab']}, T={cfg['seq_len']}, LoRA r={cfg['rank']} on "
      f"query/key/value/out/up/down; {results['base_params'] / 1e6:.1f}M base params; "
      f"a batch of {n} sequences, {n} adapters.",
      "",
      report.environment_line(env),
      "",
      report.markdown_table(
          ["variant", "ms per batch (median)", "q1", "q3"],
          [[{"mixed": "mixed: each example its own adapter, one pass",
             "one_adapter": "one adapter for the whole batch",
             "loop": f"loop: {n} passes of one example"}[k],
            v["median_ms"], v["q1_ms"], v["q3_ms"]] for k, v in ms.items()]),
      "",
      report.markdown_table(
          ["ratio of times", "median", "q1", "q3", "of fastest", "target", "met"],
          [[k, v["median"], v["q1"], v["q3"], v["of_fastest"], f"≥ {v['target']}",
            "yes" if v["median"] >= v["target"] else "**no**"]
           for k, v in results["ratios"].items()]),
      "",
      "Mixed outputs against the loop: max |diff| "
      f"{results['agreement']['max_abs_diff_mixed_vs_loop']:.2g} (logits up to "
      f"{results['agreement']['max_abs_logit']:.3g}).",
  ]
  return "\n".join(lines)


def main(argv):
  sizes.start(argv)
  cfg = sizes.config(batch=_ADAPTERS.value)
  results = run(cfg, _ADAPTERS.value, sizes.ROUNDS.value, sizes.WARMUP.value)
  report.publish(sizes.OUT.value, "mixed_batch", results, markdown(results))


if __name__ == "__main__":
  for _name, _default in (("d_model", 256), ("seq_len", 64), ("rounds", 15),
                          ("warmup", 2)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
