"""The sweep job: LoRA settings on the main job, each against full fine-tuning from one base.

``<workdir>`` ends up holding

* ``base/``: the base (unless ``base_checkpoint`` names another), as the
  fine-tuning job makes it;
* ``full/<name>/``: full fine-tuning, once per schedule the points use
  (``default``: the config's), the reference each point's gain is a share of;
* ``points/<name>/``: one LoRA fine-tune per point (``trainer.train``'s
  workdir: checkpoints, metrics, ``result.json``, adapter);
* ``sweep.md``, ``sweep.json``, ``sweep.png``: the table and the plot
  (:mod:`experiments.sweep_report`), rewritten after every point.

A point is named by the fields it overrides (``lr=0.03,targets=attn``), so
the same setting reached from two stages runs once, and a rerun finds its
``result.json`` and does not train it again.
"""

import dataclasses
import itertools
import os
from typing import Any, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments import finetuning
from experiments import lm_data
from experiments import lm_model
from experiments import sweep_report
from experiments import trainer
from experiments import variants

START = ('config', 'best')
# Short names of fields in point names; other fields appear as their path.
SHORT = {
    'learning_rate.lora': 'lr', 'lora.targets': 'targets', 'lora.full': 'full',
    'lora.rank': 'r', 'lora.alpha': 'alpha', 'lora.rslora': 'rslora',
    'lora.init_stddev': 'init', 'lora.tune_vectors': 'vectors',
    'lora.use_dora': 'dora', 'loraplus_lr_ratio': 'loraplus',
    'num_steps': 'steps', 'warmup_steps': 'warmup',
}
# Fields that change only the LoRA run: a point that overrides nothing else
# shares the default full fine-tune.
_LORA_ONLY = ('lora.', 'learning_rate.lora', 'loraplus_lr_ratio')


@dataclasses.dataclass(frozen=True)
class Point:
  """One setting: the fields of the config it overrides.

  Attributes:
    stage: the stage that first reached it.
    overrides: ``(field, value)`` pairs sorted by field, values as the stage
      wrote them (a preset's name, not its regexes); none equal to the
      config's own value.
  """
  stage: str
  overrides: tuple[tuple[str, Any], ...]

  @property
  def name(self) -> str:
    return point_name(self.overrides)


def _format(value: Any) -> str:
  if isinstance(value, bool):
    return 'on' if value else 'off'
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '+'.join(str(v) for v in value) or 'none'
  return str(value)


def point_name(overrides: Sequence[tuple[str, Any]]) -> str:
  """``'lr=0.03,targets=attn'``, or ``'default'`` when nothing is overridden."""
  return ','.join(f'{SHORT.get(f, f)}={_format(v)}' for f, v in overrides) or 'default'


def has_field(config: ml_collections.ConfigDict, field: str) -> bool:
  node = config
  for key in field.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return False
    node = node[key]
  return True


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for key in field.split('.'):
    node = node[key]
  return node


def resolve(config: ml_collections.ConfigDict, field: str, value: Any) -> Any:
  """``value`` as the field takes it: a preset's regexes for its name, tuples for lists."""
  current = get_field(config, field)
  if isinstance(current, tuple) and isinstance(value, str):
    if value not in config.presets:
      raise ValueError(f'{field}={value!r}: no preset of that name; presets: '
                       f'{tuple(config.presets)}.')
    return tuple(config.presets[value])
  if isinstance(value, list):
    return tuple(value)
  return value


def check(config: ml_collections.ConfigDict) -> None:
  """Checks the stages against the config, without devices or files.

  Raises:
    ValueError: a malformed stage, an unknown start, a field the config does
      not have (and ``optional_fields`` does not name), an unknown preset.
  """
  names = set()
  for stage in config.stages:
    if not (isinstance(stage, (tuple, list)) and len(stage) == 3):
      raise ValueError(f'config.stages: {stage!r} is not (name, start, axes).')
    name, start, axes = stage
    if name in names:
      raise ValueError(f'config.stages: two stages named {name!r}.')
    names.add(name)
    if start not in START:
      raise ValueError(f'Stage {name!r}: start={start!r}; expected one of {START}.')
    for axis in axes:
      if not (isinstance(axis, (tuple, list)) and len(axis) == 2 and axis[1]):
        raise ValueError(f'Stage {name!r}: axis {axis!r} is not (field, values).')
      field, values = axis
      if not has_field(config, field):
        if field in config.optional_fields:
          continue
        raise ValueError(f'Stage {name!r}: the config has no field {field!r} '
                         '(a typo? fields arriving later go in config.optional_fields).')
      for value in values:
        resolve(config, field, value)


def normalize(config: ml_collections.ConfigDict,
              overrides: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  """Sorted overrides, without those equal to the config's own value."""
  kept = {f: v for f, v in overrides.items()
          if not has_field(config, f) or resolve(config, f, v) != get_field(config, f)}
  return tuple(sorted(kept.items()))


def expand(config: ml_collections.ConfigDict, stage: Sequence[Any],
           start: Sequence[tuple[str, Any]]) -> Iterator[Point]:
  """The points of ``stage``: its axes' product, over the overrides ``start``."""
  name, _, axes = stage
  fields = [field for field, _ in axes]
  for values in itertools.product(*[values for _, values in axes]):
    yield Point(name, normalize(config, dict(start, **dict(zip(fields, values)))))


def point_config(config: ml_collections.ConfigDict,
                 overrides: Sequence[tuple[str, Any]]) -> ml_collections.ConfigDict:
  """The fine-tuning config of a point: ``config`` with ``overrides`` set."""
  point = config.copy_and_resolve_references()
  for field, value in overrides:
    *parents, key = field.split('.')
    node = point
    for parent in parents:
      node = node[parent]
    node[key] = resolve(config, field, value)
  return point


def full_overrides(overrides: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
  """The overrides that change full fine-tuning too (the schedule, the seed, ...)."""
  return tuple((f, v) for f, v in overrides if not f.startswith(_LORA_ONLY))


def missing_fields(config: ml_collections.ConfigDict, point: Point) -> list[str]:
  return [f for f, _ in point.overrides if not has_field(config, f)]


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The finished point with the lowest val bits/byte that fits the budget."""
  fits = [r for r in rows if r.get('val_bpb') is not None and r['within_budget']]
  return min(fits, key=lambda r: r['val_bpb']) if fits else None


def _row(point: Point, result: dict[str, Any], base: dict[str, Any],
         full: dict[str, Any], budget: int) -> dict[str, Any]:
  gain = base['val_bpb'] - result['val_bpb']
  full_gain = base['val_bpb'] - full['val_bpb']
  return dict(
      name=point.name, stage=point.stage, overrides=[list(o) for o in point.overrides],
      val_bpb=result['val_bpb'], test_bpb=result['test_bpb'],
      trainable_params=result['trainable_params'],
      param_fraction=result['trainable_params'] / full['trainable_params'],
      share_of_full_gain=gain / full_gain if full_gain else None,
      within_budget=result['trainable_params'] <= budget, full=full['name'],
      step_time_s=result.get('step_time_s'), num_steps=result.get('num_steps'))


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Runs every stage of ``config.stages``; returns the report (``sweep.json``).

  Args:
    config: a configs/sweep.py config, checked by ``launch.check_config``.
    workdir: where the base (unless ``config.base_checkpoint``), the full
      fine-tunes, the points and the report go.
    mesh: devices to run on.

  Raises:
    app.UsageError: as the fine-tuning job (another base, a workdir holding
      a run with other settings).
  """
  params = finetuning.base_params(config, workdir, mesh)
  data = lm_data.load(config.domain)
  forward = lm_model.make_forward(config.pretrain.model)
  base = finetuning.evaluate_base(config, params, data, mesh)
  full_count = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  budget = int(config.max_trainable_fraction * full_count)
  logging.info('Sweep: base val %.3f bits/byte; full fine-tuning trains %d '
               'parameters, the budget is %d.', base['val_bpb'], full_count, budget)
  fulls: dict[str, dict[str, Any]] = {}
  rows: list[dict[str, Any]] = []
  skipped: list[dict[str, Any]] = []
  seen: set[str] = set()

  def report() -> dict[str, Any]:
    chosen = best(rows)
    record = dict(base=base, full=list(fulls.values()), points=rows, skipped=skipped,
                  budget=budget, max_trainable_fraction=config.max_trainable_fraction,
                  best=chosen and chosen['name'])
    if jax.process_index() == 0:
      sweep_report.write(workdir, record)
    return record

  def full_for(overrides):
    key = full_overrides(overrides)
    name = point_name(key)
    if name not in fulls:
      cfg = point_config(config, key)
      result = trainer.train(variants.full(cfg, forward, params), data, cfg,
                             os.path.join(workdir, 'full', name), mesh)
      fulls[name] = dict(result, name=name, overrides=[list(o) for o in key])
    return fulls[name]

  full_for(())
  report()
  for stage in config.stages:
    name, start, _ = stage
    origin = best(rows) if start == 'best' else None
    if start == 'best' and origin is None:
      logging.warning('Stage %r starts from the best point, and no point fits '
                      'the budget yet: starting from the config.', name)
    overrides = [tuple(o) for o in origin['overrides']] if origin else ()
    for point in expand(config, stage, overrides):
      if point.name in seen:
        continue
      seen.add(point.name)
      missing = missing_fields(config, point)
      if missing:
        reason = (f'the config has no field {", ".join(missing)} yet (see '
                  'config.optional_fields)')
        print(f'Sweep: skipping point {point.name} of stage {name!r}: {reason}.',
              flush=True)
        skipped.append(dict(name=point.name, stage=name, reason=reason))
        continue
      cfg = point_config(config, point.overrides)
      full = full_for(point.overrides)
      result = trainer.train(variants.lora(cfg, forward, params), data, cfg,
                             os.path.join(workdir, 'points', point.name), mesh)
      rows.append(_row(point, result, base, full, budget))
      logging.info('Sweep point %s: val %.3f bits/byte, %.0f%% of full\'s gain.',
                   point.name, result['val_bpb'],
                   100 * (rows[-1]['share_of_full_gain'] or 0))
      report()
  record = report()
  if jax.process_index() == 0:
    print('\n' + sweep_report.table(record), flush=True)
  return record
