r"""Memory, error and matmul time of one quantized kernel against fp32 and bf16.

    python benchmarks/quant.py                       # a 4096x4096 kernel, x of 8 tokens
    python benchmarks/quant.py --d_in=1024 --d_out=1024 --rounds=5   # quick

For each storage (fp32, bf16, NF4, NF4 + double quantization, int8) reports
the bytes the kernel's leaves take (bits per parameter), the quantization
error (RMS of ``dequantize(q) - w`` over RMS of ``w``) and, timed in
alternating rounds, a jitted forward ``x @ w`` (dequantized per call for the
quantized kinds) relative to fp32. Writes benchmarks/results/quant.json and .md.
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
import jax.numpy as jnp
import numpy as np
import xrapture

from benchmarks import report
from benchmarks import sizes
from benchmarks import timing

_D_IN = flags.DEFINE_integer("d_in", 4096, "Kernel input size (the blocked axis).")
_D_OUT = flags.DEFINE_integer("d_out", 4096, "Kernel output size.")
_TOKENS = flags.DEFINE_integer("tokens", 8, "Rows of x in the timed x @ w.")

_KINDS = {
    "fp32": None,
    "bf16": None,
    "nf4": dict(scheme="nf4"),
    "nf4+dq": dict(scheme="nf4", double_quant=True),
    "int8": dict(scheme="int8"),
}


def _kernels(w):
  out = {}
  for name, kwargs in _KINDS.items():
    if name == "fp32":
      out[name] = w
    elif name == "bf16":
      out[name] = w.astype(jnp.bfloat16)
    else:
      out[name] = xrapture.quantize_array(w, **kwargs)
  return out


def _nbytes(kernel):
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(kernel))


def _dense(kernel):
  return xrapture.dequantize(kernel) if xrapture.is_implicit(kernel) else kernel


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  rng = np.random.default_rng(0)
  w = jnp.asarray(0.02 * rng.standard_t(5, size=(_D_IN.value, _D_OUT.value)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(_TOKENS.value, _D_IN.value)), jnp.float32)
  kernels = _kernels(w)
  matmul = jax.jit(xrapture.use_implicit_args(lambda x, w: x @ w.astype(jnp.float32)))
  steps = {name: (lambda k=k: jax.block_until_ready(matmul(x, k))) for name, k in kernels.items()}
  times = timing.alternate(steps, rounds=sizes.ROUNDS.value, warmup=sizes.WARMUP.value)
  rms = float(jnp.sqrt(jnp.mean(w ** 2)))
  rows = {}
  for name, kernel in kernels.items():
    error = _dense(kernel).astype(jnp.float32) - w
    rows[name] = dict(
        bytes=_nbytes(kernel),
        bits_per_param=8 * _nbytes(kernel) / w.size,
        relative_rms_error=float(jnp.sqrt(jnp.mean(error ** 2))) / rms,
        matmul_vs_fp32=timing.paired_ratio(times, name, "fp32"),
    )
  env = timing.environment()
  results = dict(shape=[_D_IN.value, _D_OUT.value], tokens=_TOKENS.value, kinds=rows,
                 times=timing.summarize(times), environment=env)
  table = report.markdown_table(
      ["storage", "MiB", "bits/param", "relative RMS error", "x @ w time ÷ fp32"],
      [[name, row["bytes"] / 2**20, row["bits_per_param"], row["relative_rms_error"],
        row["matmul_vs_fp32"]["median"]] for name, row in rows.items()])
  markdown = (f"Kernel {_D_IN.value}×{_D_OUT.value}, x of {_TOKENS.value} rows "
              f"(median of {sizes.ROUNDS.value} rounds).\n\n{table}\n\n"
              f"{report.environment_line(env)}\n")
  report.publish(sizes.OUT.value, "quant", results, markdown)

if __name__ == "__main__":
  app.run(main)
