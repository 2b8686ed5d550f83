"""The launcher: flags, then the config checked, devices, and the job it names.

experiments/pretrain.py, experiments/finetune.py and experiments/sweep.py
define ``--config`` and ``--workdir`` and call :func:`main`, which

1. checks the config (:func:`check_config`: no devices needed, so a bad
   flag fails at once, on every process alike);
2. starts ``jax.distributed`` if ``config.distributed`` (before anything
   touches a JAX backend; :mod:`experiments.distributed`);
3. checks the workdir, makes the mesh, checks that batches divide over it,
   and saves the config (process 0);
4. runs ``JOBS[config.job]``: pretraining, fine-tuning or a sweep of
   fine-tunes.
"""

import os
import sys
import tempfile
from typing import Any, Callable

from absl import app
from absl import logging
from absl.logging import converter
import jax
import ml_collections

from experiments import atomic
from experiments import distributed
from experiments import finetuning
from experiments import pretraining
from experiments import sharding
from experiments import sweeping
from experiments import variants

JOBS: dict[str, Callable[..., Any]] = {
    'pretrain': pretraining.run,
    'finetune': finetuning.run,
    'sweep': sweeping.run,
}


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s flag parser; an unknown ``--config.<field>`` is a usage error.

  ml_collections raises a bare ``AttributeError`` for an override naming no
  field of the config (under ``lock_config=True``); this turns it into the
  same one-line "FATAL Flags parsing error" as any other bad flag.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = e
    while isinstance(detail, Exception) and detail.args:  # AttributeError(KeyError(str))
      detail = detail.args[0]
    overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    sys.stderr.write(
        f'FATAL Flags parsing error: {", ".join(overrides)}: no such config field: '
        + ' '.join(str(detail).split()) + '\n'
        'Pass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)


def _trainings(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """``(flag prefix, training config)`` of every training the job may run."""
  if config.job == 'pretrain':
    return [('--config.', config)]
  runs = [('--config.', config)]
  if not config.base_checkpoint:  # the base is pretrained first if missing
    runs.append(('--config.pretrain.', config.pretrain))
  return runs


def _model(config: ml_collections.ConfigDict) -> tuple[str, Any]:
  """``(flag prefix, model config)`` of the job's model."""
  if config.job == 'pretrain':
    return '--config.model.', config.model
  return '--config.pretrain.model.', config.pretrain.model


def check_config(config: ml_collections.ConfigDict) -> None:
  """What can be checked of a config without devices or files.

  Raises:
    app.UsageError: an unknown job or method, a malformed sweep stage, a
      malformed mesh, a model whose width does not split over its heads, a
      sequence longer than the model takes, a step count or cadence below 1.
  """
  if config.job not in JOBS:
    raise app.UsageError(f'--config.job={config.job!r}: expected one of {tuple(JOBS)}.')
  if config.job == 'finetune':
    unknown = [m for m in config.methods if m not in variants.METHODS]
    if unknown:
      raise app.UsageError(f'Unknown methods {unknown} in --config.methods; '
                           f'known: {tuple(variants.METHODS)}.')
  if config.job == 'sweep':
    try:
      sweeping.check(config)
    except ValueError as e:
      raise app.UsageError(f'--config.stages: {e}') from e
  try:
    sharding.check_mesh_shape(config.mesh)
  except ValueError as e:
    raise app.UsageError(f'--config.mesh: {e}') from e
  model_prefix, model = _model(config)
  if model.d_model % model.num_heads:
    raise app.UsageError(f'{model_prefix}d_model={model.d_model} is not a multiple '
                         f'of {model_prefix}num_heads={model.num_heads}.')
  for prefix, training in _trainings(config):
    if training.seq_len > model.max_len:
      raise app.UsageError(f"{prefix}seq_len={training.seq_len} exceeds the model's "
                           f'{model_prefix}max_len={model.max_len}.')
    for field in ('num_steps', 'batch_size', 'seq_len', 'eval_every', 'eval_batches',
                  'checkpoint_every', 'log_every'):
      if training[field] < 1:
        raise app.UsageError(f'{prefix}{field}={training[field]} must be at least 1.')


def check_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Every batch splits evenly over the mesh's ``data`` axis.

  Raises:
    app.UsageError: a batch size is not a multiple of it.
  """
  data = mesh.shape['data']
  for prefix, training in _trainings(config):
    if training.batch_size % data:
      raise app.UsageError(
          f"{prefix}batch_size={training.batch_size} does not split over the mesh's "
          f"'data' axis of {data} devices (mesh {dict(mesh.shape)}, "
          f'{jax.process_count()} process(es)); use a multiple of {data} or another '
          '--config.mesh.')


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that files can be written there.

  Raises:
    app.UsageError: it cannot be created or written.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=atomic.TMP_PREFIX + 'probe-'):
      pass
  except OSError as e:
    raise app.UsageError(f'--workdir={workdir} is not a writable directory: {e}') from e
  return workdir


def _quiet_orbax(record: Any) -> bool:
  """A log filter: orbax's info lines (dozens per checkpoint) go; its warnings stay."""
  return (record.levelno >= converter.STANDARD_WARNING
          or f'{os.sep}orbax{os.sep}' not in record.pathname)


def setup(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """Steps 1 to 3 of :func:`main`.

  Returns:
    The device mesh ``config.mesh`` describes.

  Raises:
    app.UsageError: a bad config, an unwritable workdir, an impossible mesh,
      processes that disagree (see :func:`distributed.start`).
  """
  check_config(config)
  if _quiet_orbax not in logging.get_absl_handler().filters:
    logging.get_absl_handler().addFilter(_quiet_orbax)
  if config.distributed:
    distributed.start(config, workdir)
  check_workdir(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise app.UsageError(f'--config.mesh: {e}') from e
  check_batches(config, mesh)
  logging.info('Devices: %d (%s); mesh %s; workdir %s', jax.device_count(),
               jax.devices()[0].platform, dict(mesh.shape), workdir)
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  return mesh


def main(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs the job ``config.job`` in ``workdir``; returns what the job returns."""
  mesh = setup(config, workdir)
  return JOBS[config.job](config, workdir, mesh)
