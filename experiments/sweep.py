r"""Sweeps LoRA settings on the main job, each against full fine-tuning from one base.

  python experiments/sweep.py --config=configs/sweep.py --workdir=./sweep

Pretrains the base in ``<workdir>/base`` if missing (or takes
``--config.base_checkpoint``), then runs the stages of configs/sweep.py and
writes ``sweep.md``, ``sweep.json`` and ``sweep.png`` (see
experiments/sweeping.py). Rerun with the same workdir to resume; finished
points are not trained again.
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
    'config', None, 'Sweep config, e.g. configs/sweep.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for the base, every point, the full fine-tunes '
    'and the report; created if missing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  launch.main(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
