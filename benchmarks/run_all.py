r"""Every benchmark, one after another, each in its own process.

    python benchmarks/run_all.py            # the full set (~15 min on 2 cores)
    python benchmarks/run_all.py --quick    # toy sizes, seconds: does it all run?

Runs memory.py (one subprocess per variant and batch size), scaling.py and
last step_time.py (the headline table, measured as late as possible), writing
benchmarks/results/{memory,scaling,step_time}.{json,md} and scaling.png.
``--only=first_step`` runs first_step.py (the first step of 12- to 48-layer
models, ~10 min), ``--only=qlora`` runs qlora.py (QLoRA memory, time and error; ~30 min at its
306M-parameter default), ``--only=remat`` remat.py (memory on demand, ~5 min),
which the default set leaves out.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

_QUICK = flags.DEFINE_bool("quick", False, "Toy sizes: checks that everything runs.")
_RESULTS = flags.DEFINE_string(
    "results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    "Directory for the JSON, markdown and PNG files.")
_ONLY = flags.DEFINE_list("only", ["memory", "scaling", "step_time"], "Which benchmarks, in order.")

_QUICK_FLAGS = {
    "memory": ["--d_model=64", "--n_layers=1", "--vocab=64", "--seq_len=16",
               "--batches=2", "--variants=full,xrapture"],
    "scaling": ["--widths=32,64", "--ranks=2,4", "--vocab=64", "--seq_len=16",
                "--rounds=2", "--warmup=1", "--head_dim=16"],
    "step_time": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                  "--rounds=2", "--warmup=1", "--compile_reps=1"],
    "first_step": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                   "--depths=2,4", "--rounds=1"],
    "breakdown": ["--d_model=64", "--head_dim=16", "--vocab=64", "--seq_len=16",
                  "--rounds=2", "--warmup=1"],
    "remat": ["--d_model=64", "--head_dim=16", "--n_layers=2", "--vocab=64", "--seq_len=16",
              "--rounds=2", "--warmup=1"],
    "qlora": ["--d_model=64", "--head_dim=16", "--n_layers=1", "--vocab=64", "--seq_len=16",
              "--rounds=2", "--warmup=1", "--memory_steps=2", "--block=32"],
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  here = os.path.dirname(os.path.abspath(__file__))
  for name in _ONLY.value:
    cmd = [sys.executable, os.path.join(here, f"{name}.py"),
           f"--out={os.path.join(_RESULTS.value, name + '.json')}"]
    if _QUICK.value:
      cmd += _QUICK_FLAGS[name]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
  app.run(main)
