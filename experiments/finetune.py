r"""Fine-tunes a pretrained byte-level LM on a new domain: LoRA vs baselines.

  python experiments/finetune.py --config=configs/finetune.py --workdir=./workdir

Pretrains the base on the stdlib's Python modules if ``<workdir>/base`` lacks
it, fine-tunes it on the Python reference text with LoRA, full fine-tuning
and head-only training, and writes the comparison table, curves, metrics and
adapters to the workdir (see configs/finetune.py and
experiments/finetuning.py). Rerun with the same workdir to resume.

Several devices: ``--config.mesh='(4, 2)'`` splits batches 4 ways and the
kernels (adapters included) 2 ways. Several hosts: run the same command on
every host with ``--config.distributed=True``, which calls
``jax.distributed.initialize()`` (coordinator address, process count and id
from the cluster environment, e.g. SLURM or Cloud TPU, or from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``); the
mesh then spans every host's devices and process 0 writes the files.
"""

import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# The repository root, for `experiments.*`; appended so an installed xrapture wins.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import finetuning  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import launch  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Fine-tuning config, e.g. configs/finetune.py or '
    'configs/finetune.py:lora.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for the base model, checkpoints, metrics, '
    'adapters and the results table; created if missing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  mesh = launch.setup(_CONFIG.value, _WORKDIR.value)
  finetuning.run(_CONFIG.value, _WORKDIR.value, mesh)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
