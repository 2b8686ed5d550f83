r"""Where xrapture's step spends its time over the bound: the LoRA rule taken apart.

    python benchmarks/breakdown.py                 # d=256, r=8 (the widest gap)
    python benchmarks/breakdown.py --d_model=1024  # where the dense products dominate

A diagnostic, not a user's step. The benchmark LM's xrapture step is built
several times, each with a different rule for ``lora_matmul`` (the custom VJP
every adapted ``hk.Linear`` goes through), and alternated with the bound in
one process:

* ``no rank work`` — forward ``x @ w`` only, backward ``∂x = ∂y @ wᵀ`` only;
  the adapters' gradients are zeros tied to ``∂y`` (so the backward pass is
  not dead code, and XLA still drops the ``∂x`` nobody needs, below the first
  adapter, as it does for the real rule). What is left is the step's structure: the adapters' Adam,
  the interpreter's reshapes, dispatch.
* ``+ forward rank work`` — the real forward (``x @ b``, ``(x b s) @ a``), the
  backward still dense only.
* ``all but ∂b`` — the real rule, except the gradient of ``b``
  (``xᵀ @ ∂u``: the only backward product that reads the saved layer input).
* ``xrapture`` — the real rule.
* ``xrapture, optax.flatten(adam)`` — the real rule, with the adapters' Adam
  run on one vector of all of them (the README's CPU tip): one update where
  the row above has one per adapter leaf.

The rules are swapped with ``lora_matmul.defvjp`` while each variant traces,
and restored after. Writes benchmarks/results/breakdown.json and .md.
"""

import contextlib
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

from xrapture._src.implicit import interpreter
from xrapture._src.lora import dot_general

from benchmarks import lm
from benchmarks import report
from benchmarks import sizes
from benchmarks import tables
from benchmarks import timing
from benchmarks import variants

FLAT = f"xrapture, {tables.FLAT_OPTIMIZER}"
VARIANTS = ("no rank work", "+ forward rank work", "all but ∂b", "xrapture", FLAT)


def _dense_dx(w_axis, precision, w, g):
  return interpreter.call(dot_general._dot, g, w, 1, 1 - w_axis, precision)  # pylint: disable=protected-access


def _tied_zeros(like, g):
  return jnp.zeros_like(like) + 0 * g.reshape(-1)[0]


def _fwd_dense(x, w, a, b, w_axis, scale, precision, pet):
  del scale
  y = interpreter.call(dot_general._dot, x, w, 1, w_axis, precision, pet)  # pylint: disable=protected-access
  return y, (x, w, a, b, None)


def _bwd_dense(w_axis, scale, precision, pet, res, g):
  del scale, pet
  x, w, a, b, _ = res
  dx = _dense_dx(w_axis, precision, w, g)
  return dx.astype(x.dtype), None, _tied_zeros(a, g), _tied_zeros(b, g)


def _bwd_without_db(w_axis, scale, precision, pet, res, g):
  dx, _, da, db = dot_general._lora_matmul_bwd(w_axis, scale, precision, pet, res, g)  # pylint: disable=protected-access
  return dx, None, da, _tied_zeros(db, g)


RULES = {
    "no rank work": (_fwd_dense, _bwd_dense),
    "+ forward rank work": (dot_general._lora_matmul_fwd, _bwd_dense),  # pylint: disable=protected-access
    "all but ∂b": (dot_general._lora_matmul_fwd, _bwd_without_db),  # pylint: disable=protected-access
    "xrapture": (dot_general._lora_matmul_fwd, dot_general._lora_matmul_bwd),  # pylint: disable=protected-access
}
RULES[FLAT] = RULES["xrapture"]   # the real rule; only the optimizer differs


@contextlib.contextmanager
def rule(fwd, bwd):
  """``lora_matmul`` differentiated by ``fwd``/``bwd`` inside; the rule it had, after."""
  before = dot_general.lora_matmul.fwd, dot_general.lora_matmul.bwd
  dot_general.lora_matmul.defvjp(fwd, bwd)
  try:
    yield
  finally:
    dot_general.lora_matmul.defvjp(*before)


def run(cfg: lm.Config, rounds: int, warmup: int) -> dict:
  env = timing.environment()
  batch = lm.batch(cfg)
  base = jax.jit(lm.dense_model(cfg).init)(jax.random.PRNGKey(0), batch[0])
  adapted = variants.adapted_params(cfg, base)
  steps = {"bound": variants.bound(cfg, base, batch)}
  for name in VARIANTS:
    with rule(*RULES[name]):
      steps[name] = variants.xrapture_variant(cfg, base, adapted, batch, name=name,
                                              flat_optimizer=name == FLAT)
      steps[name].step()   # traces under this rule
  times = timing.alternate({n: v.step for n, v in steps.items()}, rounds, warmup)
  env["loadavg_end"] = timing.load_average()
  return {"environment": env, "config": cfg.__dict__, "variants": list(VARIANTS),
          "step_ms": timing.summarize(times),
          "over_bound": {n: timing.paired_ratio(times, n, "bound") for n in VARIANTS},
          "raw_seconds": times}


def markdown(results: dict) -> str:
  return tables.breakdown_table(results)


def main(argv):
  sizes.start(argv)
  results = run(sizes.config(), sizes.ROUNDS.value, sizes.WARMUP.value)
  report.publish(sizes.OUT.value, "breakdown", results, markdown(results))


if __name__ == "__main__":
  for _name, _default in (("d_model", 256), ("rounds", 30)):
    flags.FLAGS.set_default(_name, _default)
  app.run(main)
