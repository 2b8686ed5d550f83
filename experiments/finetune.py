r"""Fine-tunes a pretrained byte-level LM on a new domain: LoRA vs baselines.

  python experiments/finetune.py --config=configs/finetune.py --workdir=./workdir

Pretrains the base on the stdlib's Python modules if ``<workdir>/base`` lacks
it, fine-tunes it on the Python reference text with LoRA, full fine-tuning
and head-only training, and writes the comparison table, curves, metrics and
adapters to the workdir (see configs/finetune.py and
experiments/finetuning.py). Rerun with the same workdir to resume.

Several devices: ``--config.mesh='(4, 2)'`` splits batches 4 ways and the
kernels (adapters included) 2 ways. Several processes: the same command on
each with ``--config.distributed=True`` and ``--config.cluster.*`` (or a
cluster environment that jax.distributed reads); see experiments/launch.py
and the README's "Several processes".
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  launch.main(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
