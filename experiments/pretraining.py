"""Pretraining the base on domain A (configs/pretrain.py, or a fine-tuning config's ``pretrain``).

The workdir ends up holding the run's checkpoints and metrics, and the base
as :mod:`experiments.lm_model` saves it (``base.safetensors``, then
``model.json``).
"""

from typing import Any

from absl import logging
import haiku as hk
import jax
import ml_collections
import xrapture

from experiments import lm_data
from experiments import lm_model
from experiments import sharding
from experiments import trainer

# Keys of the pretraining config that change the trained weights.
_TRAJECTORY_KEYS = ('seed', 'domain', 'num_steps', 'batch_size', 'seq_len',
                    'learning_rate', 'warmup_steps', 'weight_decay', 'grad_clip_norm')


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh) -> Any:
  """Pretrains per ``config`` in ``workdir``, resuming; a finished base is loaded.

  Returns:
    The trained parameters (also saved in ``workdir``).
  """
  if not lm_model.has_base(workdir):
    params = lm_model.init_params(config.model, config.seed)
    fingerprint = {k: config[k] for k in _TRAJECTORY_KEYS}
    fingerprint['model'] = config.model.to_dict()
    base_run = trainer.Run(
        name='pretrain', apply=hk.transform(lm_model.make_forward(config.model)).apply,
        params=params, base_params=params,
        lora_spec=jax.tree.map(lambda _: xrapture.LORA_FULL, params),
        tx=trainer.make_optimizer(config.learning_rate, config),
        fingerprint=fingerprint, export=lm_model.BASE)
    data = lm_data.load(config.domain)
    logging.info('Pretraining on %r: %s', config.domain, data.describe())
    result = trainer.train(base_run, data, config, workdir, mesh)
    logging.info('Base model: val %.3f, test %.3f bits/byte on %r.',
                 result['val_bpb'], result['test_bpb'], config.domain)
    if jax.process_index() == 0:
      lm_model.mark_base_finished(workdir, config.model, domain=config.domain,
                                  result=result)
    sharding.sync('pretraining: base written')
  return lm_model.load_base(workdir, config.model)
