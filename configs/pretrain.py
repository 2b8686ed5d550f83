r"""Pretrains the base model: a byte-level Transformer LM on domain A.

Domain A is the Python standard library's own modules (``code``, see
experiments/lm_data.py); configs/finetune.py then adapts the base to domain B.

  python experiments/pretrain.py --config=configs/pretrain.py --workdir=/tmp/base

Fields can be overridden on the command line, e.g.
``--config.num_steps=2000 --config.model.num_layers=4``.
``--config=configs/pretrain.py:smoke`` trains a tiny model for a few steps:
a check of the pipeline in seconds (the smoke tests use it).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the pretraining config.

  Args:
    arg: None, or ``'smoke'`` for a tiny model and a few steps.
  """
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'Unknown config argument {arg!r}: use configs/pretrain.py '
                     'or configs/pretrain.py:smoke.')
  # seed, domain, model, learning_rate and the training loop's fields.
  config = common.pretraining()
  # job ('pretrain'), mesh, distributed, cluster.
  common.add_launch_fields(config, 'pretrain')
  if arg == 'smoke':
    common.shrink(config)
  return config
