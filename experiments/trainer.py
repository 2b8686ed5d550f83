"""The training loop: jitted steps on a mesh, validation, metrics, checkpoints.

One call of :func:`train` runs one :class:`Run` to ``config.num_steps``,
resuming from the newest checkpoint in ``<workdir>/checkpoints`` if there is
one. Batches are a function of ``(seed, step)`` and the step is deterministic,
so an interrupted run that is started again ends with the same parameters
as one that was never interrupted.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

from absl import app
from absl import logging
import jax
import ml_collections
import numpy as np
import optax
import tqdm
import xrapture

from experiments import atomic
from experiments import checkpointing
from experiments import lm_data
from experiments import lm_model
from experiments import metrics as metrics_lib
from experiments import sharding

METRICS = metrics_lib.FILE
RESULT = 'result.json'


@dataclasses.dataclass
class Run:
  """What to train.

  Attributes:
    name: names the run in logs, metrics and the table.
    apply: ``apply(params, rng, tokens [B, T]) -> logits [B, T, V]``.
    params: initial params (with LoraWeights for a LoRA run), on the host.
    base_params: the frozen base, which checkpoints are applied to.
    lora_spec: per base parameter: adapter rank, ``LORA_FULL`` or
      ``LORA_FREEZE`` (as ``model.lora_spec(base_params)``).
    tx: the optimizer (frozen leaves get no state).
    fingerprint: JSON-able settings that determine the trajectory; a
      checkpoint written under other settings is refused. :func:`train` adds
      the content hash of ``base_params``.
    export: file name, in the run's workdir, of the final trainable part.
  """
  name: str
  apply: Callable[..., jax.Array]
  params: Any
  base_params: Any
  lora_spec: Any
  tx: optax.GradientTransformation
  fingerprint: dict[str, Any]
  export: str = 'adapter.safetensors'


def make_optimizer(learning_rate: float, config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Clipped AdamW with linear warmup and cosine decay over ``config.num_steps``."""
  warmup = min(config.warmup_steps, config.num_steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup, max(config.num_steps, warmup + 1),
      end_value=learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def bits_per_byte(loss_nats: float) -> float:
  return float(loss_nats) / math.log(2.0)


def tree_bytes(tree: Any) -> int:
  """Total bytes of the arrays in ``tree``."""
  return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(tree)))


def make_evaluator(apply: Callable[..., jax.Array], mesh: jax.sharding.Mesh,
                   params_sharding: Any) -> Callable[[Any, list[np.ndarray]], float]:
  """Returns ``evaluate(params, batches) -> mean next-byte loss (nats)``."""
  def batch_loss(params, tokens):
    return lm_model.next_token_loss(apply(params, None, tokens), tokens)
  batch_loss = jax.jit(
      batch_loss, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh))

  def evaluate(params, batches):
    losses = [batch_loss(params, sharding.put_batch(mesh, b)) for b in batches]
    return float(np.mean(jax.device_get(losses)))
  return evaluate


@dataclasses.dataclass
class _Clock:
  """Wall time of training steps alone (not compilation, validation, saving)."""
  seconds: float = 0.0
  steps: int = 0
  _since: float | None = dataclasses.field(default=None, repr=False)

  def start(self) -> None:
    self._since = time.perf_counter()

  def stop(self, steps: int) -> float:
    """Counts ``steps`` steps since :meth:`start`; returns their seconds."""
    elapsed = time.perf_counter() - self._since if self._since is not None else 0.0
    self._since = None
    self.seconds += elapsed
    self.steps += steps
    return elapsed


def make_train_step(run: Run, mesh: jax.sharding.Mesh, state_sharding: Any,
                    seed: int) -> Callable[..., Any]:
  """Returns ``step((params, opt_state), tokens, step) -> (new state, loss)``, jitted.

  The state keeps ``state_sharding``; batches are split over ``'data'``. The
  rng handed to ``run.apply`` (LoRA dropout, if any) is a function of the step.
  """
  base_key = jax.random.PRNGKey(seed)

  def loss_fn(params, tokens, rng):
    return lm_model.next_token_loss(run.apply(params, rng, tokens), tokens)

  def step_fn(state, tokens, step):
    params, opt_state = state
    rng = jax.random.fold_in(base_key, step)
    # allow_int: a quantized base (QLoRA) holds integer codes; they are
    # frozen, and their float0 gradients get zero updates (wrap_optimizer).
    loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params, tokens, rng)
    updates, opt_state = run.tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated))


def content_digest(tree: Any) -> str:
  """SHA-256 of every leaf's path, dtype, shape and bytes: names a base by its content."""
  digest = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.asarray(x)
    digest.update(f'{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}|'.encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return 'sha256:' + digest.hexdigest()


def _check_fingerprint(workdir: str, fingerprint: dict[str, Any],
                       is_writer: bool) -> None:
  """Refuses to resume a run that was started with other settings or another base."""
  path = os.path.join(workdir, 'fingerprint.json')
  fingerprint = json.loads(json.dumps(fingerprint))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if 'base' not in saved:
      raise app.UsageError(
          f'{workdir} holds a run started by an older version of the experiments '
          '(no hash of its base in fingerprint.json, checkpoints in another '
          'format). Use another --workdir, or delete that directory to start over.')
    if saved['base'] != fingerprint['base']:
      raise app.UsageError(
          f'{workdir} holds a run trained from another base: its params hash '
          f"to {saved['base']} there, {fingerprint['base']} now (was "
          '--config.base_checkpoint changed, or the base retrained?). Resuming '
          'would put its adapters on a base they were not trained for. Use '
          'another --workdir, or delete that directory to start over.')
    if saved != fingerprint:
      diff = sorted(k for k in set(saved) | set(fingerprint)
                    if saved.get(k) != fingerprint.get(k))
      lines = [f'  {k}: {saved.get(k)!r} there, {fingerprint.get(k)!r} now' for k in diff]
      raise app.UsageError(
          f'{workdir} holds a run started with other settings:\n' + '\n'.join(lines)
          + '\nUse another --workdir, or delete that directory to start over.')
  elif is_writer:
    atomic.write_json(path, fingerprint)


def train(run: Run, data: lm_data.Corpus, config: ml_collections.ConfigDict,
          workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Trains ``run`` on ``data``'s train split to ``config.num_steps``.

  Args:
    run: what to train.
    data: the corpus (train split for steps, val split for validation).
    config: ``seed``, ``num_steps``, ``batch_size``, ``seq_len``,
      ``eval_every``, ``eval_batches``, ``final_eval_batches``,
      ``checkpoint_every``, ``keep_checkpoints``, ``log_every``,
      ``progress_bar`` (see configs/common.py).
    workdir: this run's directory (checkpoints, metrics, result).
    mesh: devices to run on.

  Returns:
    The result record (also in ``<workdir>/result.json``): final val and test
    bits per byte, trainable parameter count, optimizer-state bytes, mean
    step time, adapter file size. A run already complete is not trained
    again; its saved result is returned.
  """
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  fingerprint = dict(run.fingerprint, base=content_digest(run.base_params))
  _check_fingerprint(workdir, fingerprint, is_writer)
  result_path = os.path.join(workdir, RESULT)
  if os.path.exists(result_path):  # finished (num_steps is in the fingerprint)
    with open(result_path) as f:
      return json.load(f)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if is_writer:
    for name in (atomic.remove_leftovers(workdir)
                 + atomic.remove_leftovers(ckpt_dir)):
      logging.info('%s: removed %s, left by a killed writer.', workdir, name)
  sharding.sync(f'{run.name}: fingerprint checked')

  with checkpointing.Checkpoints(ckpt_dir, config.keep_checkpoints) as checkpoints:
    return _train(run, data, config, workdir, mesh, fingerprint, checkpoints)


def _train(run: Run, data: lm_data.Corpus, config: ml_collections.ConfigDict,
           workdir: str, mesh: jax.sharding.Mesh, fingerprint: dict[str, Any],
           checkpoints: checkpointing.Checkpoints) -> dict[str, Any]:
  """:func:`train` from the newest checkpoint on."""
  is_writer = jax.process_index() == 0
  params, opt_state = sharding.put_tree(mesh, (run.params, run.tx.init(run.params)))
  start, resumed = 0, {}
  latest = checkpoints.latest_step()
  if latest is not None and latest > config.num_steps:
    raise app.UsageError(f'{checkpoints.directory} has a checkpoint at step '
                         f'{latest}, past num_steps={config.num_steps}; use a '
                         'fresh workdir.')
  restored = checkpoints.restore_latest(params, run.lora_spec, opt_state, mesh)
  if restored is not None:
    start, params, opt_state, resumed = restored
    if resumed.get('fingerprint') != json.loads(json.dumps(fingerprint)):
      raise app.UsageError(
          f'{checkpoints.directory} holds checkpoints of another run (their '
          'fingerprint differs from this run\'s fingerprint.json); use a fresh '
          'workdir.')
    logging.info('%s: resuming from step %d (%s)', run.name, start,
                 checkpoints.directory)

  state_sharding = sharding.tree_shardings(mesh, (params, opt_state))
  train_step = make_train_step(run, mesh, state_sharding, config.seed)
  evaluate = make_evaluator(run.apply, mesh, state_sharding[0])
  val_batches = lm_data.eval_batches(data.splits['val'], config.batch_size,
                                     config.seq_len, config.eval_batches)
  metrics = metrics_lib.Writer(os.path.join(workdir, METRICS), start, is_writer)
  train_data = data.splits['train']
  tokens_per_step = config.batch_size * config.seq_len

  def batch(step):
    return sharding.put_batch(mesh, lm_data.train_batch(
        train_data, config.seed, step, config.batch_size, config.seq_len))

  bar = tqdm.tqdm(total=config.num_steps, initial=start, desc=run.name,
                  disable=not (config.progress_bar and is_writer),
                  dynamic_ncols=True, mininterval=1.0)
  clock = _Clock(**(resumed.get('clock') or {}))
  if start == 0:
    val = evaluate(params, val_batches)
    metrics.write(run=run.name, step=0, split='val', loss=val, bpb=bits_per_byte(val))
  pending = 0  # steps dispatched since the clock last started
  window_losses = list(resumed.get('window_losses', []))  # since the last log
  for step in range(start, config.num_steps):
    (params, opt_state), loss = train_step((params, opt_state), batch(step),
                                           np.int32(step))
    window_losses.append(loss)
    bar.update(1)
    done = step + 1
    if step == start:
      jax.block_until_ready(loss)  # the first step compiles: not timed
      clock.start()
    else:
      pending += 1
    log = done % config.log_every == 0 or done == config.num_steps
    evaluate_now = done % config.eval_every == 0 or done == config.num_steps
    save_now = done % config.checkpoint_every == 0 or done == config.num_steps
    if not (log or evaluate_now or save_now):
      continue
    # Waits for the step. The logged loss is the mean over the steps since
    # the last log, so it does not depend on where a run was resumed.
    window_losses = [float(x) for x in jax.device_get(window_losses)]
    loss = float(np.mean(np.asarray(window_losses, np.float64)))
    seconds = clock.stop(pending)
    if not math.isfinite(loss):
      raise FloatingPointError(f'{run.name}: loss is {loss} at step {done}.')
    postfix = dict(loss=f'{loss:.3f}')
    if pending:
      postfix['tok_s'] = f'{tokens_per_step * pending / seconds:,.0f}'
    if log:
      metrics.write(run=run.name, step=done, split='train', loss=loss,
                    bpb=bits_per_byte(loss), steps=len(window_losses),
                    **({'tokens_per_s': tokens_per_step * pending / seconds}
                       if pending else {}))
      window_losses = []
    if evaluate_now:
      val = evaluate(params, val_batches)
      metrics.write(run=run.name, step=done, split='val', loss=val,
                    bpb=bits_per_byte(val))
      postfix['val_bpb'] = f'{bits_per_byte(val):.3f}'
    bar.set_postfix(postfix)
    pending = 0
    if save_now:
      checkpoints.save(done, params, run.lora_spec, opt_state, extra=dict(
          run=run.name, seed=config.seed, next_batch=done, fingerprint=fingerprint,
          clock=dict(seconds=clock.seconds, steps=clock.steps),
          window_losses=window_losses))
    clock.start()
  bar.close()

  val_bpb, test_bpb = final_eval(evaluate, params, data, config)
  adapter = os.path.join(workdir, run.export)
  # Every process calls it: it gathers the arrays (collectives) and returns
  # once process 0 has written the file.
  xrapture.save_adapter(adapter, params, run.lora_spec)
  result = dict(
      run=run.name, num_steps=config.num_steps, val_bpb=val_bpb, test_bpb=test_bpb,
      trainable_params=xrapture.count_trainable(run.params, run.lora_spec),
      # The weights as stored during training (a quantized base's codes and
      # absmaxes, not its float values).
      param_bytes=tree_bytes(params),
      opt_state_bytes=tree_bytes(opt_state),
      step_time_s=clock.seconds / clock.steps if clock.steps else None,
      tokens_per_s=tokens_per_step * clock.steps / clock.seconds if clock.steps else None,
      adapter_bytes=os.path.getsize(adapter))
  if is_writer:
    atomic.write_json(os.path.join(workdir, RESULT), result)
  sharding.sync(f'{run.name}: result written')
  return result


def final_eval(evaluate: Callable[[Any, list[np.ndarray]], float], params: Any,
               data: lm_data.Corpus, config: ml_collections.ConfigDict
               ) -> tuple[float, float]:
  """Bits per byte on the val and test splits.

  On ``config.final_eval_batches`` batches spread over each split, or on
  every non-overlapping window when that is 0.
  """
  return tuple(
      bits_per_byte(evaluate(params, lm_data.eval_batches(
          data.splits[split], config.batch_size, config.seq_len,
          config.final_eval_batches or None)))
      for split in ('val', 'test'))
