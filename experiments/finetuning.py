"""Pretrained base → domain B, three ways, and the table that compares them.

``<workdir>`` ends up holding

* ``base/``: the base pretrained on domain A (unless ``base_checkpoint`` names
  another), with its own checkpoints and metrics;
* ``lora/``, ``full/``, ``head/``: per method, ``checkpoints/``,
  ``metrics.jsonl``, ``result.json`` and the final ``adapter.safetensors``;
* ``results.md``, ``results.json``, ``curves.png``: the comparison
  (:func:`report.write`).
"""

import os
from typing import Any

from absl import logging
import haiku as hk
import jax
import ml_collections

from experiments import lm_data
from experiments import lm_model
from experiments import pretraining
from experiments import report
from experiments import sharding
from experiments import trainer
from experiments import variants

def base_params(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh) -> Any:
  """The base from ``config.base_checkpoint``, or ``<workdir>/base`` (pretrained there if missing)."""
  if config.base_checkpoint:
    return lm_model.load_base(config.base_checkpoint, config.pretrain.model)
  base_dir = os.path.join(workdir, 'base')
  if not lm_model.has_base(base_dir):
    logging.info('No base model in %s yet: pretraining it on %r.', base_dir,
                 config.pretrain.domain)
  pretrain = config.pretrain
  if not config.progress_bar:  # the launcher's flag covers the base's run too
    pretrain = pretrain.copy_and_resolve_references()
    pretrain.progress_bar = False
  return pretraining.run(pretrain, base_dir, mesh)


def evaluate_base(config: ml_collections.ConfigDict, params: Any,
                  data: lm_data.Corpus, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The base's row of the table: its bits/byte on domain B, untrained."""
  apply = hk.transform(lm_model.make_forward(config.pretrain.model)).apply
  params = sharding.put_tree(mesh, params)
  evaluate = trainer.make_evaluator(apply, mesh, sharding.tree_shardings(mesh, params))
  val_bpb, test_bpb = trainer.final_eval(evaluate, params, data, config)
  return dict(run='base', val_bpb=val_bpb, test_bpb=test_bpb, trainable_params=0,
              opt_state_bytes=0, step_time_s=None, tokens_per_s=None,
              adapter_bytes=None)


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh) -> list[dict[str, Any]]:
  """Fine-tunes the base with every method in ``config.methods``; returns the table's rows.

  Args:
    config: a configs/finetune.py config, checked by ``launch.check_config``.
    workdir: where the base (unless ``config.base_checkpoint``), each method's
      run and the table go.
    mesh: devices to run on.

  Raises:
    app.UsageError: a base of another architecture, a workdir holding a run
      with other settings or another base.
  """
  params = base_params(config, workdir, mesh)
  data = lm_data.load(config.domain)
  logging.info('Fine-tuning on %r: %s', config.domain, data.describe())

  results = [evaluate_base(config, params, data, mesh)]
  logging.info('Base model on %r: val %.3f bits/byte.', config.domain,
               results[0]['val_bpb'])
  forward = lm_model.make_forward(config.pretrain.model)
  for method in config.methods:
    method_run = variants.METHODS[method](config, forward, params)
    results.append(trainer.train(method_run, data, config,
                                 os.path.join(workdir, method), mesh))

  if jax.process_index() == 0:
    print('\n' + report.write(config, workdir, results), flush=True)
  return results
