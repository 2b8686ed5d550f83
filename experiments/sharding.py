"""A ``data × model`` device mesh and how parameters and batches lie on it.

Batches are split along their first axis over ``data``. Every parameter
array with two or more dimensions (LoraWeight ``w``, ``a`` and ``b`` alike:
they are ordinary pytree leaves) is split along its last axis over ``model``
when that axis divides evenly, and replicated otherwise; so are optimizer
moments, which share their parameter's shape. XLA's partitioner inserts the
collectives, so the same jitted step runs on one device or many.

Several hosts: call ``jax.distributed.initialize()`` before anything else
(``--config.distributed=True`` does), give every host the same command; the
mesh then spans all hosts' devices, each host builds the same global batch
and hands over only its own shards (:func:`put_batch`). Every process writes
its own shards of a checkpoint; other files only process 0 writes (an
adapter: every process calls ``xrapture.save_adapter``, which gathers the
arrays and lets process 0 write), and :func:`sync` makes the others wait.
"""

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'model')


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``('data', 'model')`` mesh.

  Args:
    shape: ``(data, model)`` sizes; one of them may be -1 for "all remaining
      devices". The product must divide the number of devices; the first
      ``data * model`` devices are used.
    devices: defaults to ``jax.devices()``.

  Raises:
    ValueError: a malformed shape, or more devices asked for than exist.
  """
  shape = check_mesh_shape(shape)
  devices = list(jax.devices() if devices is None else devices)
  if -1 in shape:
    known = -np.prod(shape)
    if len(devices) % known:
      raise ValueError(f'mesh {shape}: {len(devices)} devices are not a multiple '
                       f'of {known}.')
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  size = int(np.prod(shape))
  if size > len(devices):
    raise ValueError(f'mesh {shape} needs {size} devices; there are '
                     f'{len(devices)} ({devices[0].platform}).')
  return Mesh(np.asarray(devices[:size]).reshape(shape), AXES)


def check_mesh_shape(shape: Sequence[int]) -> tuple[int, int]:
  """``shape`` as a ``(data, model)`` pair of ints, checked without devices.

  Raises:
    ValueError: not two sizes, each positive or -1, at most one -1.
  """
  try:
    sizes = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    sizes = None
  if (sizes is None or len(sizes) != 2 or sizes.count(-1) > 1
      or any(s == 0 or s < -1 for s in sizes)):
    raise ValueError(f'mesh must be (data, model) with positive sizes or one -1; '
                     f'got {shape!r}.')
  return sizes


def leaf_sharding(mesh: Mesh, x: Any) -> NamedSharding:
  """Last axis over ``model`` for arrays of rank ≥ 2 that divide; else replicated."""
  shape = np.shape(x)
  model = mesh.shape['model']
  if len(shape) >= 2 and shape[-1] % model == 0:
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), 'model'))
  return NamedSharding(mesh, P())


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """:func:`leaf_sharding` for every array leaf of ``tree`` (LoraWeights included)."""
  return jax.tree.map(lambda x: leaf_sharding(mesh, x), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """A global batch (the same on every host) placed as ``P('data')``.

  Raises:
    ValueError: the batch does not split evenly over the ``data`` axis.
  """
  if batch.shape[0] % mesh.shape['data']:
    raise ValueError(f'batch size {batch.shape[0]} is not divisible by the mesh '
                     f"'data' axis ({mesh.shape['data']}).")
  sharding = batch_sharding(mesh)
  return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


def put_tree(mesh: Mesh, tree: Any) -> Any:
  """Places host (or device) arrays per :func:`tree_shardings`."""
  shardings = tree_shardings(mesh, tree)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s,
                                                lambda idx: np.asarray(x)[idx]),
      tree, shardings)


def all_processes(flag: bool) -> bool:
  """Whether ``flag`` holds on every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
  return bool(np.all(flags))


def sync(name: str) -> None:
  """Waits until every process reaches this point (e.g. after process 0 wrote a file)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
