"""What both launchers do before training: flags, workdir, devices."""

import os
import sys
import tempfile

from absl import app
from absl import logging
import jax
import ml_collections

from experiments import atomic
from experiments import sharding


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


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that files can be written there.

  Raises:
    app.UsageError: it cannot be created or written.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.probe-'):
      pass
  except OSError as e:
    raise app.UsageError(f'--workdir={workdir} is not a writable directory: {e}') from e
  return workdir


def setup(config: ml_collections.ConfigDict, workdir: str) -> jax.sharding.Mesh:
  """Initializes multi-host JAX if asked, checks the workdir, saves the config.

  Returns:
    The device mesh ``config.mesh`` describes.

  Raises:
    app.UsageError: an unwritable workdir or an impossible mesh.
  """
  if config.distributed:
    jax.distributed.initialize()
  check_workdir(workdir)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise app.UsageError(f'--config.mesh: {e}') from e
  logging.info('Devices: %d (%s); mesh %s; workdir %s', jax.device_count(),
               jax.devices()[0].platform, dict(mesh.shape), workdir)
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  return mesh
