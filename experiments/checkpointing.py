"""Training checkpoints: one directory per step, complete or absent.

``<dir>/step_00000200/`` holds

* ``trainable.safetensors``: what training changes (adapters and full-trained
  leaves), written by ``xrapture.save_adapter``; the frozen base is not
  copied;
* ``opt_state.npz``: the optimizer state's leaves, in pytree order;
* ``state.json``: the step (which is also the data position: batches are a
  function of ``(seed, step)``), the optimizer leaves' paths, and whatever
  the trainer adds.

A checkpoint is written under a temporary name and renamed into place, so a
run killed mid-write leaves either the previous checkpoints or the new one,
never a half-written directory that :func:`latest_step` would pick.
"""

import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import xrapture

_STEP_DIR = re.compile(r'^step_(\d{8})$')
TRAINABLE = 'trainable.safetensors'
OPT_STATE = 'opt_state.npz'
STATE = 'state.json'


def step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, f'step_{step:08d}')


def write_json(path: str, record: Any) -> None:
  """Writes ``record`` as JSON atomically (temporary file, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(record, f, indent=1, sort_keys=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save(directory: str, step: int, params: Any, lora_spec: Any, opt_state: Any,
         extra: dict[str, Any] | None = None, keep: int = 2) -> str:
  """Writes the checkpoint of ``step`` atomically; keeps the newest ``keep``.

  Args:
    directory: the run's checkpoint directory.
    step: the number of steps taken.
    params: host copies of the (adapted) params.
    lora_spec: which leaves are trainable (``model.spec(base_params)``).
    opt_state: host copy of the optimizer state.
    extra: JSON-able fields for ``state.json``.
    keep: how many checkpoints to keep (older ones are deleted).

  Returns:
    The checkpoint's directory.
  """
  final = step_dir(directory, step)
  if os.path.isdir(final):
    return final
  os.makedirs(directory, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-step_{step:08d}-', dir=directory)
  try:
    xrapture.save_adapter(os.path.join(tmp, TRAINABLE), params, lora_spec)
    leaves = jax.tree.leaves(opt_state)
    np.savez(os.path.join(tmp, OPT_STATE),
             **{f'{i:06d}': np.asarray(x) for i, x in enumerate(leaves)})
    state = dict(extra or {}, step=step, opt_state_paths=_leaf_paths(opt_state))
    write_json(os.path.join(tmp, STATE), state)
    os.replace(tmp, final)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  for old in all_steps(directory)[:-keep] if keep > 0 else []:
    shutil.rmtree(step_dir(directory, old), ignore_errors=True)
  return final


def all_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in ``directory``, ascending."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    match = _STEP_DIR.match(name)
    if match and os.path.exists(os.path.join(directory, name, STATE)):
      steps.append(int(match.group(1)))
  return sorted(steps)


def latest_step(directory: str) -> int | None:
  steps = all_steps(directory)
  return steps[-1] if steps else None


def restore(directory: str, step: int, base_params: Any,
            opt_state_template: Any) -> tuple[Any, Any, dict[str, Any]]:
  """Reads the checkpoint of ``step``.

  Args:
    directory: the run's checkpoint directory.
    step: which checkpoint.
    base_params: the frozen base the trainable part is applied to.
    opt_state_template: an optimizer state of the right structure (e.g.
      ``tx.init(params)``).

  Returns:
    ``(params, opt_state, state)``: numpy/JAX arrays on the host, and the
    ``state.json`` record.

  Raises:
    ValueError: the checkpoint does not fit ``base_params`` or the optimizer.
  """
  path = step_dir(directory, step)
  with open(os.path.join(path, STATE)) as f:
    state = json.load(f)
  params = xrapture.load_adapter(os.path.join(path, TRAINABLE), base_params)
  expected = _leaf_paths(opt_state_template)
  if state['opt_state_paths'] != expected:
    raise ValueError(
        f'{path} holds the optimizer state of another setup: its leaves are '
        f"{state['opt_state_paths'][:4]}..., expected {expected[:4]}... "
        '(did the config change? use a fresh workdir).')
  with np.load(os.path.join(path, OPT_STATE)) as arrays:
    leaves = [arrays[f'{i:06d}'] for i in range(len(expected))]
  template_leaves, treedef = jax.tree.flatten(opt_state_template)
  for saved, want, name in zip(leaves, template_leaves, expected):
    if saved.shape != np.shape(want) or saved.dtype != np.dtype(want.dtype):
      raise ValueError(f'{path}: optimizer leaf {name} is {saved.shape} {saved.dtype}, '
                       f'expected {np.shape(want)} {np.dtype(want.dtype)}.')
  return params, jax.tree.unflatten(treedef, leaves), state
