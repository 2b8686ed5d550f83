r"""The dense products alone: torch's GEMMs against XLA's, on the benchmark LM's shapes.

    python benchmarks/gemm.py                       # widths 256..1024, T·B = 512 tokens
    python benchmarks/gemm.py --widths=256 --rounds=5

A LoRA step is mostly its frozen dense products (d ≥ 512 here), and xrapture
and PEFT run the same ones, so XLA's GEMM time ÷ torch's on those shapes is
the part of xrapture ÷ PEFT that no LoRA rule changes; the rest is each
library's other work (torch's per-op costs, the rank products, Adam). This
times those products and nothing else, so that a result set says what a
machine's GEMMs give either side.

For each width ``d``, one call does a layer's dense products (benchmarks/lm.py
at that width): the four ``d×d`` projections, ``d → 4d`` and ``4d → d``, each
forward (``x @ w``) and as the input gradient (``∂y @ wᵀ``, the transposed
weight read in place), on ``batch · seq_len`` tokens of float32. JAX runs them
as one jitted function, torch (``torch.no_grad``, as many threads as XLA's
pool) as the same matmuls in a row; the two are alternated, and the reported
ratio is the median over rounds of torch's time ÷ XLA's in the same round.
Writes benchmarks/results/gemm.json and .md.
"""

import importlib.util
import os
import sys

# Run as a script: the repository root, appended.
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
import jax
import numpy as np

from benchmarks import report
from benchmarks import sizes
from benchmarks import tables
from benchmarks import timing


def layer_shapes(d: int) -> list[tuple[int, int]]:
  """``(in, out)`` of one block's dense kernels: q, k, v, out, up, down."""
  return [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]


def operands(d: int, tokens: int, seed: int = 0):
  """Per kernel: the input ``x [T, in]``, the output gradient ``g [T, out]``, ``w``."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  return [(normal(tokens, k), normal(tokens, n), normal(k, n) / np.float32(np.sqrt(k)))
          for k, n in layer_shapes(d)]


def jax_products(ops):
  """A step-like callable: every ``x @ w`` and ``g @ wᵀ`` in one jit."""
  args = jax.device_put(ops)
  f = jax.jit(lambda ops: [(x @ w, g @ w.T) for x, g, w in ops])

  def run():
    return jax.block_until_ready(f(args))
  return run


def torch_products(ops):
  """The same products in torch, in a row; torch's threads set by the caller."""
  import torch  # pylint: disable=g-import-not-at-top
  args = [tuple(torch.from_numpy(a) for a in op) for op in ops]

  def run():
    with torch.no_grad():
      return [(x @ w, g @ w.T) for x, g, w in args]
  return run


def max_relative_difference(xla_run, torch_run) -> float:
  """Largest relative difference of the products the two timed callables return."""
  worst = 0.0
  for mine, theirs in zip(xla_run(), torch_run(), strict=True):
    for a, b in zip(mine, theirs, strict=True):
      a, b = np.asarray(a), b.numpy()
      worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
  return worst


def run(widths: list[int], tokens: int, rounds: int, warmup: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  threads = timing.cpu_threads()
  torch.set_num_threads(threads)
  out = {"environment": timing.environment(), "tokens": tokens, "threads": threads,
         "rounds": rounds, "widths": {}}
  for d in widths:
    ops = operands(d, tokens)
    flops = sum(2 * 2 * tokens * k * n for k, n in layer_shapes(d))
    steps = {"xla": jax_products(ops), "torch": torch_products(ops)}
    difference = max_relative_difference(steps["xla"], steps["torch"])  # same numbers first
    times = timing.alternate(steps, rounds, warmup)
    out["widths"][str(d)] = {
        "gflop": flops / 1e9, "step_ms": timing.summarize(times),
        "torch_over_xla": timing.paired_ratio(times, "torch", "xla"),
        "max_relative_difference": difference}
  out["environment"]["loadavg_end"] = timing.load_average()
  return out


markdown = tables.gemm_table


def main(argv):
  sizes.start(argv)
  if importlib.util.find_spec("torch") is None:
    raise app.UsageError("gemm.py times torch's GEMMs against XLA's, and torch is not "
                         "installed here: pip install '.[peft]' (or torch alone).")
  results = run([int(w) for w in sizes.WIDTHS.value], sizes.BATCH.value * sizes.SEQ_LEN.value,
                sizes.ROUNDS.value, sizes.WARMUP.value)
  report.publish(sizes.OUT.value, "gemm", results, markdown(results))


if __name__ == "__main__":
  app.run(main)
