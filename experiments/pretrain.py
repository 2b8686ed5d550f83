r"""Pretrains the base byte-level Transformer LM on domain A.

  python experiments/pretrain.py --config=configs/pretrain.py --workdir=/tmp/base

Trains on the stdlib's Python modules (see configs/pretrain.py) and writes
``base.safetensors`` and ``model.json`` to the workdir; fine-tune from it with
``experiments/finetune.py --config.base_checkpoint=/tmp/base``. (finetune.py
also pretrains on its own when its workdir has no base.) Rerun with the same
workdir to resume.

Several devices: ``--config.mesh='(4, 2)'`` splits batches 4 ways and kernels
2 ways. Several processes: the same command on each with
``--config.distributed=True`` and ``--config.cluster.*``; see
experiments/launch.py and the README's "Several processes".
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
    'config', None, 'Pretraining config, e.g. configs/pretrain.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and the base model; '
    'created if missing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  launch.main(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
