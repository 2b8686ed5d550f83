"""The base model: pretrain it on domain A, save it, load it back.

A pretraining workdir holds, next to the run's checkpoints and metrics,

* ``base.safetensors``: every parameter (written with ``xrapture.save_adapter``
  and a spec that marks all of them ``LORA_FULL``);
* ``model.json``: the architecture it was trained with, written last: its
  presence marks a finished base.
"""

import json
import os
from typing import Any

from absl import app
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import xrapture

from experiments import atomic
from experiments import lm_data
from experiments import lm_model
from experiments import sharding
from experiments import trainer

BASE = 'base.safetensors'
MODEL = 'model.json'
# Keys of the pretraining config that change the trained weights.
_TRAJECTORY_KEYS = ('seed', 'domain', 'num_steps', 'batch_size', 'seq_len',
                    'learning_rate', 'warmup_steps', 'weight_decay', 'grad_clip_norm')


def init_params(model: ml_collections.ConfigDict, seed: int) -> Any:
  """Freshly initialized parameters of the architecture ``model``."""
  forward = hk.transform(lm_model.make_forward(model))
  return forward.init(jax.random.PRNGKey(seed), jnp.zeros((1, model.max_len), jnp.int32))


def check_seq_len(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  if config.seq_len > model.max_len:
    raise app.UsageError(f'seq_len={config.seq_len} exceeds the model\'s '
                         f'max_len={model.max_len}.')


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh) -> Any:
  """Pretrains per ``config`` (configs/pretrain.py) in ``workdir``; resumes.

  Returns:
    The trained parameters (also saved as ``<workdir>/base.safetensors``).
  """
  check_seq_len(config, config.model)
  if os.path.exists(os.path.join(workdir, MODEL)):  # written last
    return load(workdir, config.model)
  forward = lm_model.make_forward(config.model)
  params = init_params(config.model, config.seed)
  lora_spec = jax.tree.map(lambda _: xrapture.LORA_FULL, params)
  fingerprint = {k: config[k] for k in _TRAJECTORY_KEYS}
  fingerprint['model'] = config.model.to_dict()
  base_run = trainer.Run(
      'pretrain', hk.transform(forward).apply, params, params, lora_spec,
      trainer.make_optimizer(config.learning_rate, config), fingerprint, export=BASE)
  data = lm_data.load(config.domain)
  logging.info('Pretraining on %r: %s', config.domain, data.describe())
  result = trainer.train(base_run, data, config, workdir, mesh)
  logging.info('Base model: val %.3f, test %.3f bits/byte on %r.',
               result['val_bpb'], result['test_bpb'], config.domain)
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, MODEL),
                      dict(lm_model.architecture(config.model),
                           domain=config.domain, result=result))
  sharding.sync('pretraining: base written')
  return load(workdir, config.model)


def load(base_dir: str, model: ml_collections.ConfigDict) -> Any:
  """The base parameters saved in ``base_dir``, checked against ``model``.

  Raises:
    app.UsageError: there is no base there, or it has another architecture.
  """
  path, model_path = os.path.join(base_dir, BASE), os.path.join(base_dir, MODEL)
  if not (os.path.exists(path) and os.path.exists(model_path)):
    raise app.UsageError(
        f'No base model in {base_dir} (expected {BASE} and {MODEL}, which '
        'experiments/pretrain.py writes when it finishes).')
  with open(model_path) as f:
    saved = json.load(f)
  wanted = lm_model.architecture(model)
  diff = [f'{k}={saved.get(k)} there, {v} in the config' for k, v in wanted.items()
          if saved.get(k) != v]
  if diff:
    raise app.UsageError(
        f'The base model in {base_dir} has another architecture: '
        + '; '.join(diff) + '. Set --config.pretrain.model.* to match it, or use '
        'another base (--config.base_checkpoint) or workdir.')
  try:
    return xrapture.load_adapter(path, init_params(model, 0))
  except ValueError as e:
    raise app.UsageError(f'The base model in {base_dir} does not fit the '
                         f'config\'s architecture: {e}') from e
