"""Pretrained base → domain B, three ways, and the table that compares them.

``<workdir>`` ends up holding

* ``base/``: the base pretrained on domain A (unless ``base_checkpoint`` names
  another), with its own checkpoints and metrics;
* ``lora/``, ``full/``, ``head/``: per method, ``checkpoints/``,
  ``metrics.jsonl``, ``result.json`` and the final ``adapter.safetensors``;
* ``results.md``, ``results.json``: the comparison table;
* ``curves.png``: train and val bits/byte of every method.
"""

import json
import os
from typing import Any

from absl import app
from absl import logging
import haiku as hk
import jax
import ml_collections

from experiments import atomic
from experiments import lm_data
from experiments import lm_model
from experiments import pretraining
from experiments import report
from experiments import sharding
from experiments import trainer
from experiments import variants

RESULTS_MD = 'results.md'
RESULTS_JSON = 'results.json'
CURVES = 'curves.png'


def lora_label(spec: ml_collections.ConfigDict) -> str:
  """``'LoRA r=16 (+ head/.*, 1-D params)'``: the LoRA row's name in the table."""
  extra = list(spec.full) + (['1-D params'] if spec.tune_vectors else [])
  return f'LoRA r={spec.rank}' + (f" (+ {', '.join(extra)})" if extra else '')


def base_params(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh) -> Any:
  """The base from ``config.base_checkpoint``, or ``<workdir>/base`` (pretrained there if missing)."""
  if config.base_checkpoint:
    return pretraining.load(config.base_checkpoint, config.pretrain.model)
  base_dir = os.path.join(workdir, 'base')
  if not os.path.exists(os.path.join(base_dir, pretraining.MODEL)):
    logging.info('No base model in %s yet: pretraining it on %r.', base_dir,
                 config.pretrain.domain)
  return pretraining.run(config.pretrain, base_dir, mesh)


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
  """Everything the fine-tuning launcher does; returns the table's rows.

  Raises:
    app.UsageError: an unknown method, a sequence longer than the model
      accepts, a base of another architecture.
  """
  unknown = [m for m in config.methods if m not in variants.METHODS]
  if unknown:
    raise app.UsageError(f'Unknown methods {unknown} in config.methods; '
                         f'known: {tuple(variants.METHODS)}.')
  pretraining.check_seq_len(config, config.pretrain.model)
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
    text = report.table(results, config.domain, {'lora': lora_label(config.lora)})
    atomic.write_text(os.path.join(workdir, RESULTS_MD), text)
    atomic.write_json(os.path.join(workdir, RESULTS_JSON), results)
    panels = [(f'fine-tuning on {config.domain!r} (val at step 0: the base)',
               {m: os.path.join(workdir, m, trainer.METRICS) for m in config.methods})]
    if not config.base_checkpoint:
      panels.insert(0, (f'pretraining the base on {config.pretrain.domain!r}',
                        {'pretrain': os.path.join(workdir, 'base', trainer.METRICS)}))
    report.plot(panels, os.path.join(workdir, CURVES))
    print('\n' + text, flush=True)
  return results
