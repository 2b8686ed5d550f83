"""Command-line flags shared by the benchmark scripts: model size and timing.

Defaults are step_time.py's (DESIGN.md §4's model); memory.py and scaling.py
change some defaults when run as scripts (``flags.FLAGS.set_default``).
"""

from absl import app
from absl import flags

from benchmarks import lm
from benchmarks import timing

D_MODEL = flags.DEFINE_integer("d_model", 768, "Model width.")
N_LAYERS = flags.DEFINE_integer("n_layers", 2, "Transformer blocks.")
WIDTHS = flags.DEFINE_list("widths", ["256", "512", "768", "1024"],
                           "Model widths swept (scaling.py, gemm.py).")
HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Width of one attention head.")
VOCAB = flags.DEFINE_integer("vocab", 1024, "Vocabulary size.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence (T).")
BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step (B).")
RANK = flags.DEFINE_integer("rank", 8, "LoRA rank on query/key/value/out/up/down; alpha = 2·rank.")
ROUNDS = flags.DEFINE_integer("rounds", 30, "Timed rounds (one step of each variant a round).")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed rounds first.")
REMAT = flags.DEFINE_string(
    "remat", "nothing_saveable",
    "jax.checkpoint_policies policy of the xrapture_remat variant (memory on demand: "
    "each block under hk.remat with it; 'policy:k' for the first k blocks only).")
PEFT = flags.DEFINE_bool("peft", True, "Also time HuggingFace PEFT LoRA in torch "
                         "(pip install '.[peft]').")
STEADY_ALLOCATOR = flags.DEFINE_bool(
    "steady_allocator", True,
    "Keep freed memory in glibc's heap (timing.steady_allocator) so no variant pays page "
    "faults on its step's temporaries; --nosteady_allocator times glibc's default.")
OUT = flags.DEFINE_string("out", None, "JSON to write (.md and .png beside it); "
                          "default benchmarks/results/<script>.json.")


def config(d_model: int | None = None, batch: int | None = None,
           rank: int | None = None) -> lm.Config:
  """The lm.Config the flags describe (heads of --head_dim)."""
  d = D_MODEL.value if d_model is None else d_model
  r = RANK.value if rank is None else rank
  return lm.Config(d_model=d, n_layers=N_LAYERS.value, n_heads=max(1, d // HEAD_DIM.value),
                   vocab=VOCAB.value, seq_len=SEQ_LEN.value,
                   batch=BATCH.value if batch is None else batch,
                   rank=r, alpha=2.0 * r)


def start(argv: list[str]) -> None:
  """A timing script's ``main`` prologue: no stray arguments; the allocator set.

  Raises:
    app.UsageError: ``argv`` holds more than the program name.
  """
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if STEADY_ALLOCATOR.value:
    timing.steady_allocator()
