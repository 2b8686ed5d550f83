"""The performance targets the benchmarks report against (issues 3 and 15).

One place for each number: the scripts record them with their results and
:mod:`benchmarks.tables` reads them from here to mark each figure met or
missed.
"""

# The LoRA step ÷ the bound (forward + input gradients) at step_time.py's
# size, ÷ the hand-written LoRA, ÷ PEFT; jit compile ÷ hand-written; merged
# inference ÷ base. step_time.py records these in its results.
STEP_OVER_BOUND = 1.12
STEP_OVER_NAIVE = 0.80
STEP_OVER_PEFT = 0.90
COMPILE_OVER_NAIVE = 1.5
MERGED_OVER_BASE = (0.97, 1.03)

# At every width and rank of scaling.py: xrapture ÷ PEFT.
SCALING_OVER_PEFT = 0.85

# On a GPU (run_all.py --gpu, d >= 2048): xrapture ÷ bound, ÷ hand-written, ÷ PEFT.
GPU_OVER_BOUND = 1.10
GPU_OVER_NAIVE = 0.85
GPU_OVER_PEFT = 0.70

# LoRA's step memory ÷ full fine-tuning's (memory.py; remat.py with hk.remat),
# and the remat step ÷ plain LoRA's.
MEMORY_OVER_FULL = 0.45
REMAT_STEP_OVER_LORA = 1.25

# The first step of a deep model (first_step.py) ÷ the hand-written LoRA's.
FIRST_STEP_OVER_NAIVE = 1.0


def bound_target(width: int, rank: int) -> float:
  """xrapture ÷ bound at width ``d`` and rank ``r``: ``1 + 3r/d + 0.03``.

  Per d×d layer the rank-r products are 12·T·d·r FLOPs (two forward, four
  backward) against the bound's 4·T·d² (the forward product and the input
  gradient's), so the FLOP limit is ``1 + 3r/d``; 0.03 is the allowance.
  """
  return 1 + 3 * rank / width + 0.03


def point_target(width: int, point: dict) -> float:
  """A scaling.py point's ÷ bound target: as recorded, else :func:`bound_target`.

  Result files from before the target was recorded with each point have none.
  """
  return point.get("bound_target", bound_target(width, point["rank"]))
