r"""Every benchmark, one after another, each in its own process.

    python benchmarks/run_all.py            # the full set (~15 min on 2 cores)
    python benchmarks/run_all.py --quick    # toy sizes, seconds: does it all run?
    python benchmarks/run_all.py --gpu      # on a GPU machine: results/*_gpu*.json

Runs memory.py (one subprocess per variant and batch size), scaling.py,
gemm.py and last step_time.py (the headline table, measured as late as
possible), writing benchmarks/results/{memory,scaling,gemm,step_time}.{json,md}
and scaling.png. On another machine, ``--results_dir=benchmarks/results/<cpu>``
keeps its results beside the others (benchmarks/tables.py's OTHER_CPUS).
``--only=first_step`` runs first_step.py (the first step of 12- to 48-layer
models, ~10 min), ``--only=qlora`` runs qlora.py (QLoRA memory, time and error; ~30 min at its
306M-parameter default), ``--only=remat`` remat.py (memory on demand, ~5 min),
which the default set leaves out.
"""

import importlib.util
import os
import subprocess
import sys

from absl import app
from absl import flags

_QUICK = flags.DEFINE_bool("quick", False, "Toy sizes: checks that everything runs.")
_RESULTS = flags.DEFINE_string(
    "results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    "Directory for the JSON, markdown and PNG files.")
_ONLY = flags.DEFINE_list("only", ["memory", "scaling", "gemm", "step_time"],
                          "Which benchmarks, in order.")
_GPU = flags.DEFINE_bool(
    "gpu", False, "On a GPU machine: the GPU set (GPU_RUNS), writing results/*_gpu*.json; "
    "then `python benchmarks/tables.py` puts them in the READMEs.")

# The GPU set (issue 15: d >= 2048, targets ÷ bound <= 1.10, ÷ hand-written <=
# 0.85, ÷ PEFT <= 0.70): (script, results name, flags). PEFT runs on CUDA.
GPU_RUNS = (
    ("step_time", "step_time_gpu", ["--rounds=40", "--compile_reps=2"]),
    ("step_time", "step_time_gpu_large", ["--d_model=2048", "--n_layers=4", "--batch=16",
                                          "--seq_len=512", "--rounds=20", "--compile_reps=2"]),
    ("scaling", "scaling_gpu", ["--widths=2048,3072,4096", "--ranks=8,16,64", "--batch=16",
                                "--seq_len=512", "--rounds=10"]),
    ("memory", "memory_gpu", ["--batches=4", "--variants=full,xrapture"]),
)


def _gpu_commands(here: str, results: str) -> list[list[str]]:
  """The GPU set's command lines; a clear error where JAX sees no GPU."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    raise app.UsageError(
        f"--gpu needs a GPU, and JAX's backend here is {jax.default_backend()!r}: run it on "
        "a GPU machine with jax[cuda] installed, or leave --gpu out for the CPU set.")
  return [[sys.executable, os.path.join(here, f"{script}.py"),
           f"--out={os.path.join(results, name + '.json')}", *extra]
          for script, name, extra in GPU_RUNS]

_QUICK_FLAGS = {
    "memory": ["--d_model=64", "--n_layers=1", "--vocab=64", "--seq_len=16",
               "--batches=2", "--variants=full,xrapture"],
    "scaling": ["--widths=32,64", "--ranks=2,4", "--vocab=64", "--seq_len=16",
                "--rounds=2", "--warmup=1", "--head_dim=16"],
    "step_time": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                  "--rounds=2", "--warmup=1", "--compile_reps=1"],
    "gemm": ["--widths=32,64", "--seq_len=16", "--rounds=2", "--warmup=1"],
    "first_step": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                   "--depths=2,4", "--rounds=1"],
    "breakdown": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                  "--rounds=2", "--warmup=1"],
    "profile": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16", "--rank=3",
                "--profiled_steps=2"],
    "remat": ["--d_model=64", "--head_dim=16", "--n_layers=2", "--vocab=64", "--seq_len=16",
              "--rounds=2", "--warmup=1"],
    "qlora": ["--d_model=64", "--head_dim=16", "--n_layers=1", "--vocab=64", "--seq_len=16",
              "--rounds=2", "--warmup=1", "--memory_steps=2", "--block=32"],
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  here = os.path.dirname(os.path.abspath(__file__))
  if _GPU.value:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    for cmd in _gpu_commands(here, _RESULTS.value):
      print("$", " ".join(cmd), flush=True)
      subprocess.run(cmd, check=True, env=env)
    return
  for name in _ONLY.value:
    if name == "gemm" and importlib.util.find_spec("torch") is None:
      print("run_all: no torch here (pip install '.[peft]'): gemm.py skipped", flush=True)
      continue
    cmd = [sys.executable, os.path.join(here, f"{name}.py"),
           f"--out={os.path.join(_RESULTS.value, name + '.json')}"]
    if _QUICK.value:
      cmd += _QUICK_FLAGS[name]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
  app.run(main)
