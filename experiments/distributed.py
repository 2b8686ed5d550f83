"""Starting ``jax.distributed`` from the config: bounded waits, clear errors.

``--config.distributed=True`` on every process of a run calls :func:`start`
before anything touches a JAX backend. The coordinator address, the number
of processes and this process's id come from ``config.cluster`` where set,
else from the cluster environment (SLURM, Open MPI, Cloud TPU, ... and
``JAX_COORDINATOR_ADDRESS``), as ``jax.distributed.initialize`` finds them.

Every wait is bounded by ``config.cluster.timeout_s``: a coordinator that does
not answer, or processes that never all join (a process not started, or
processes that disagree on how many there are), end every waiting process
with an error that says which, instead of a hang. Once connected, the
processes compare their configs, so a run whose processes were given
different settings stops before it trains.
"""

import hashlib
import json
import os
import socket
import sys
import threading
from typing import Any, Callable

from absl import app
from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from xrapture._src import distributed as library_distributed

# jax's own timeout is longer, so that the watchdog's clear message comes first.
_JAX_TIMEOUT_MARGIN_S = 30
# Exit status of a process the watchdog ends.
WATCHDOG_EXIT = 3


class _Watchdog:
  """Ends the process with a message if a block takes longer than ``seconds``.

  A thread cannot interrupt a call blocked in C++ (a connect, a collective);
  the watchdog writes ``message()`` to stderr and exits the whole process.
  """

  def __init__(self, seconds: float, message: Callable[[], str]):
    self._timer = threading.Timer(seconds, self._fire)
    self._timer.daemon = True
    self._message = message

  def _fire(self) -> None:
    sys.stderr.write(f'FATAL {self._message()}\n')
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT)  # pylint: disable=protected-access

  def __enter__(self) -> '_Watchdog':
    self._timer.start()
    return self

  def __exit__(self, *exc) -> None:
    self._timer.cancel()


def _answers(address: str) -> bool:
  """Whether something accepts TCP connections at ``host:port``."""
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except (OSError, ValueError):
    return False


def _settings(cluster: ml_collections.ConfigDict) -> dict[str, Any]:
  """``jax.distributed.initialize`` arguments set in ``cluster`` (the rest auto-detected)."""
  kwargs = {}
  if cluster.coordinator_address:
    kwargs['coordinator_address'] = cluster.coordinator_address
  if cluster.num_processes > 0:
    kwargs['num_processes'] = cluster.num_processes
  if cluster.process_id >= 0:
    kwargs['process_id'] = cluster.process_id
  return kwargs


def _config_digest(config: ml_collections.ConfigDict, workdir: str) -> int:
  """A number that differs between processes given different settings."""
  record = config.to_dict()
  record['cluster'] = dict(record['cluster'], process_id=None)
  text = json.dumps([record, os.path.abspath(workdir)], sort_keys=True, default=str)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], 'big') >> 1


def start(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Connects this process to the others (``jax.distributed.initialize``).

  Args:
    config: the launcher's config (``config.cluster`` and the settings every
      process must share).
    workdir: the run's directory, which every process must share.

  Raises:
    app.UsageError: a JAX backend is already initialized, ``config.cluster``
      is incomplete where the environment does not say, or the processes
      disagree on their number or on the config. A coordinator that does
      not answer, or processes that never all join within
      ``config.cluster.timeout_s``, end the process (exit status 3) with a
      message on stderr.
  """
  cluster = config.cluster
  timeout = int(cluster.timeout_s)
  if timeout <= 0:
    raise app.UsageError(f'--config.cluster.timeout_s must be positive; got {timeout}.')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = _settings(cluster)
  address = kwargs.get('coordinator_address') or os.environ.get('JAX_COORDINATOR_ADDRESS')
  who = (f"process {kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')}"
         f' (coordinator {address or "from the cluster environment"})')

  def not_joined() -> str:
    if address and kwargs.get('process_id', 0) != 0 and not _answers(address):
      problem = (f'nothing answers at the coordinator address {address}. Process 0 '
                 'runs the coordinator: start it with the same '
                 '--config.cluster.coordinator_address')
    else:
      problem = ('not every process joined. Start one process per id 0..N-1, all '
                 'with the same --config.cluster.num_processes=N and '
                 '--config.cluster.coordinator_address')
    return (f'jax.distributed: {who} waited {timeout} s (--config.cluster.timeout_s): '
            f'{problem}.')

  logging.info('jax.distributed: connecting as %s; waiting up to %d s for every '
               'process.', who, timeout)
  with _Watchdog(timeout, not_joined):
    try:
      jax.distributed.initialize(
          **kwargs, initialization_timeout=timeout + _JAX_TIMEOUT_MARGIN_S,
          shutdown_timeout_seconds=timeout + _JAX_TIMEOUT_MARGIN_S)
    except (RuntimeError, ValueError, TypeError) as e:
      raise app.UsageError(
          f'jax.distributed.initialize failed for {who}: {e}. Set '
          '--config.cluster.coordinator_address, num_processes and process_id '
          'where the cluster environment does not provide them.') from e
  # Before the first compilation (the agreement check's allgather).
  library_distributed.avoid_cache_hang()
  _check_agreement(config, workdir, kwargs.get('num_processes'), timeout)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _check_agreement(config: ml_collections.ConfigDict, workdir: str,
                     num_processes: int | None, timeout: int) -> None:
  """Every process has the same process count, config and workdir, or all raise."""
  mine = np.asarray([num_processes or jax.process_count(),
                     _config_digest(config, workdir)], np.int32)

  def stuck() -> str:
    return (f'jax.distributed: process {jax.process_index()} waited {timeout} s for '
            'the other processes to compare their configs.')
  with _Watchdog(timeout, stuck):
    everyone = np.asarray(multihost_utils.process_allgather(mine))
  counts = {i: int(n) for i, (n, _) in enumerate(everyone)}
  if any(n != jax.process_count() for n in counts.values()):
    raise app.UsageError(
        f'jax.distributed: {jax.process_count()} processes joined, but they were '
        f'told different numbers (process id: --config.cluster.num_processes): '
        f'{counts}. Give every process the same number.')
  differ = [i for i, (_, digest) in enumerate(everyone) if digest != everyone[0][1]]
  if differ:
    raise app.UsageError(
        f'jax.distributed: processes {differ} were started with another config or '
        '--workdir than process 0 (flags other than --config.cluster.process_id '
        'differ). Give every process the same command.')
