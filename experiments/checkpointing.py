"""Training checkpoints with orbax: atomic, sharded, multi-process, keep N.

``<dir>/<step>/`` (orbax's ``CheckpointManager`` layout) holds

* ``state/``: the trainable leaves (every LoraWeight's ``a`` and ``b``, and
  the ``LORA_FULL`` leaves; the frozen base is not copied) and the optimizer
  state, as orbax arrays: every process writes the shards it holds;
* ``meta/``: JSON: the step (which is also the data position: batches are a
  function of ``(seed, step)``), each saved leaf's path, shape and dtype,
  and whatever the trainer adds (metrics window, clock, fingerprint).

A step is written under a temporary name, its files and directories are
fsynced, and it is renamed into place, so a run killed mid-write leaves the
previous checkpoints and no half-written step. After a power loss a renamed
step can still come back truncated: :meth:`Checkpoints.restore_latest` then
warns, takes the newest step that reads back whole and deletes the newer ones.

Restoring places every leaf with the sharding the caller asks for, so a run
resumes on another mesh than it was saved from.
"""

import asyncio
import os
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
import xrapture

from experiments import atomic
from experiments import sharding

STATE = 'state'
META = 'meta'


def fsync_tree(path: str) -> None:
  """fsyncs every file and directory under ``path``, and ``path`` itself."""
  for root, _, files in os.walk(path):
    for name in files:
      atomic.fsync(os.path.join(root, name))
    atomic.fsync(root)


def _fsync_renamed(final: str) -> None:
  """After the rename: the marker orbax wrote during it, the step and its parent."""
  for name in os.listdir(final):
    if os.path.isfile(os.path.join(final, name)):  # the commit marker
      atomic.fsync(os.path.join(final, name))
  atomic.fsync(final)
  atomic.fsync(os.path.dirname(final))


class _DurableRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """orbax's write-then-rename, with the data on disk before the rename."""

  async def finalize(self, *args, **kwargs):
    await asyncio.to_thread(fsync_tree, os.fspath(self.get()))
    await super().finalize(*args, **kwargs)
    await asyncio.to_thread(_fsync_renamed, os.fspath(self.get_final()))


def _paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(leaves: dict[str, Any]) -> list[list[Any]]:
  """``[[path, shape, dtype], ...]``: what the meta record says of the leaves."""
  return [[path, list(np.shape(x)), np.dtype(x.dtype).name] for path, x in leaves.items()]


def trainable_leaves(params: Any, lora_spec: Any) -> dict[str, Any]:
  """``{path: leaf}`` of what training changes (``xrapture.split_lora_params``)."""
  keep = set(_paths(xrapture.split_lora_params(params, lora_spec)))
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if jax.tree_util.keystr(p) in keep}


def _opt_leaves(opt_state: Any) -> dict[str, Any]:
  return dict(zip(_paths(opt_state), jax.tree.leaves(opt_state)))


def _indexed(leaves: dict[str, Any]) -> dict[str, Any]:
  """Leaves keyed ``'000000'``, ``'000001'``, ...: names orbax stores as they are."""
  return {f'{i:06d}': x for i, x in enumerate(leaves.values())}


def _replace_leaves(tree: Any, new: dict[str, Any]) -> Any:
  """``tree`` with the leaves at ``new``'s paths replaced."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(
      treedef, [new.get(jax.tree_util.keystr(p), x) for p, x in flat])


class UnreadableCheckpointError(Exception):
  """A step's files do not read back (truncated, emptied, missing)."""


class Checkpoints:
  """The checkpoints of one training run.

  Every process of a multi-process run makes one and calls every method in
  the same order (orbax synchronizes them; one process writes the shared
  files).
  """

  def __init__(self, directory: str, keep: int):
    """Opens (creating if needed) ``directory``, keeping the newest ``keep`` steps."""
    self.directory = os.path.abspath(directory)
    if jax.process_index() == 0:
      self._remove_unfinished()
    sharding.sync(f'{self.directory}: unfinished steps removed')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, create=True,
        enable_async_checkpointing=False, temporary_path_class=_DurableRename)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))

  def _remove_unfinished(self) -> None:
    """Deletes the temporary directories of writes that were killed."""
    if not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ocp.path.atomicity.TMP_DIR_SUFFIX in name:
        logging.info('Removing %s, left by a killed checkpoint write.', name)
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, params: Any, lora_spec: Any, opt_state: Any,
           extra: dict[str, Any] | None = None) -> None:
    """Writes the checkpoint of ``step``; deletes steps beyond the newest ``keep``.

    Args:
      step: the number of steps taken.
      params: the (adapted) params, as host or (sharded) device arrays.
      lora_spec: which leaves are trainable (``model.lora_spec(base_params)``).
      opt_state: the optimizer state.
      extra: JSON-able fields for the meta record.
    """
    trainable = trainable_leaves(params, lora_spec)
    optimizer = _opt_leaves(opt_state)
    meta = dict(extra or {}, step=step, trainable=_describe(trainable),
                opt_state=_describe(optimizer))
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(dict(trainable=_indexed(trainable),
                                          opt_state=_indexed(optimizer))),
        META: ocp.args.JsonSave(meta)}))
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    """The meta record of ``step``.

    Raises:
      UnreadableCheckpointError: it does not read back.
    """
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f'{self._step_dir(step)}: {e}') from e
    if not isinstance(meta, dict) or meta.get('step') != step:
      raise UnreadableCheckpointError(f'{self._step_dir(step)}: meta record {meta!r:.80}')
    return meta

  def restore(self, step: int, params: Any, lora_spec: Any, opt_state: Any,
              mesh: jax.sharding.Mesh) -> tuple[Any, Any, dict[str, Any]]:
    """Reads the checkpoint of ``step`` onto ``mesh``.

    Args:
      step: which checkpoint.
      params: params of the right structure whose frozen leaves are the base
        (e.g. the run's initial params).
      lora_spec: which leaves are trainable.
      opt_state: an optimizer state of the right structure.
      mesh: where the restored leaves go (:func:`sharding.leaf_sharding`).

    Returns:
      ``(params, opt_state, meta)``: the restored leaves as arrays on
      ``mesh`` (the frozen leaves as given), and the meta record.

    Raises:
      ValueError: the checkpoint holds another setup's leaves.
      UnreadableCheckpointError: its files do not read back.
    """
    meta = self.read_meta(step)
    trainable = trainable_leaves(params, lora_spec)
    optimizer = _opt_leaves(opt_state)
    for key, what, leaves in (('trainable', 'trainable parameters', trainable),
                              ('opt_state', 'optimizer state', optimizer)):
      want = _describe(leaves)
      if meta.get(key) != want:
        diff = next(((s, w) for s, w in zip(meta.get(key) or [], want) if s != w),
                    (f'{len(meta.get(key) or [])} leaves', f'{len(want)} leaves'))
        raise ValueError(
            f'{self._step_dir(step)} holds the {what} of another setup: saved '
            f'{diff[0]}, expected {diff[1]} (did the config change? use a fresh '
            'workdir).')

    def target(x):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                  sharding=sharding.leaf_sharding(mesh, x))
    abstract = dict(trainable=_indexed(jax.tree.map(target, trainable)),
                    opt_state=_indexed(jax.tree.map(target, optimizer)))
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract)}))[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(f'{self._step_dir(step)}: {e}') from e
    new_trainable = dict(zip(trainable, state['trainable'].values()))
    new_opt = jax.tree.unflatten(jax.tree.structure(opt_state),
                                 list(state['opt_state'].values()))
    return _replace_leaves(params, new_trainable), new_opt, meta

  def restore_latest(self, params: Any, lora_spec: Any, opt_state: Any,
                     mesh: jax.sharding.Mesh
                     ) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """:meth:`restore` of the newest step that reads back whole, or None.

    A newer step that does not read back (a power loss after its rename) is
    skipped with a warning, and deleted once an older one reads back. Every
    process must be able to read a step for it to be taken.

    Raises:
      ValueError: a checkpoint holds another setup's leaves.
      UnreadableCheckpointError: there are steps, and none reads back.
    """
    errors, unreadable = [], []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, params, lora_spec, opt_state, mesh)
        error = None
      except UnreadableCheckpointError as e:
        restored, error = None, e
      if sharding.all_processes(error is None):
        for bad in unreadable:  # training to them again writes them anew
          self._manager.delete(bad)
        return (step, *restored)
      errors.append(error or f'{self._step_dir(step)}: another process cannot read it')
      unreadable.append(step)
      logging.warning('Checkpoint %s does not read back (%s); trying the one '
                      'before (it is deleted if that one reads back).',
                      self._step_dir(step), errors[-1])
    if errors:
      raise UnreadableCheckpointError(
          f'No checkpoint in {self.directory} reads back:\n'
          + '\n'.join(f'  {e}' for e in errors)
          + '\nDelete that directory to train from the start.')
    return None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))
