"""The fine-tuning report: the comparison table (markdown, JSON) and the curves (PNG)."""

import os
from typing import Any, Sequence

import ml_collections

from experiments import atomic
from experiments import metrics

RESULTS_MD = 'results.md'
RESULTS_JSON = 'results.json'
CURVES = 'curves.png'

_LABELS = {'pretrain': 'pretraining', 'base': 'base (no fine-tune)', 'lora': 'LoRA',
           'qlora': 'QLoRA', 'full': 'full fine-tune', 'head': 'head-only'}


def _bytes(n: int | None) -> str:
  if n is None:
    return '–'
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError


def _count(n: int | None) -> str:
  return '–' if n is None else f'{n:,}'


def table(results: Sequence[dict[str, Any]], domain: str,
          labels: dict[str, str] | None = None) -> str:
  """A markdown table, one row per result record (see trainer.train).

  Args:
    results: the base's record first, then one per method.
    domain: names the corpus in the header.
    labels: run name -> the method's name in the table, where the default
      (``'LoRA'``, ``'full fine-tune'``, ...) should say more.
  """
  labels = dict(_LABELS, **(labels or {}))
  base = results[0]
  full = next((r for r in results if r['run'] == 'full'), None)
  lines = [
      f'| method | val bits/byte ({domain}) | test bits/byte | val gain over base '
      '| trainable params | weights in memory | optimizer state | step time | tokens/s '
      '| adapter file |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    step = r.get('step_time_s')
    rate = r.get('tokens_per_s')
    gain = base['val_bpb'] - r['val_bpb']
    gain_text = '–' if r is base else f'{gain:.3f}'
    if full is not None and r is not base and full is not r:
      share = gain / (base['val_bpb'] - full['val_bpb'])
      gain_text += f' ({share:.0%} of full\'s)'
    lines.append(
        f"| {labels.get(r['run'], r['run'])} | {r['val_bpb']:.3f} | {r['test_bpb']:.3f} "
        f"| {gain_text} | {_count(r.get('trainable_params'))} "
        f"| {_bytes(r.get('param_bytes'))} | {_bytes(r.get('opt_state_bytes'))} "
        f"| {'–' if step is None else f'{step * 1000:.0f} ms'} "
        f"| {'–' if rate is None else f'{rate:,.0f}'} "
        f"| {_bytes(r.get('adapter_bytes'))} |")
  return '\n'.join(lines) + '\n'


def plot(panels: Sequence[tuple[str, dict[str, str]]], path: str) -> None:
  """Train and val bits/byte against step: one panel per stage, one colour per run.

  Args:
    panels: ``(title, {run name: its metrics.jsonl})`` per panel.
    path: the PNG to write (atomically).
  """
  # Imported here: the launcher's other processes, and runs that fail
  # before the report, do not pay its start-up.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(6 * len(panels), 4.5))  # no pyplot: no global state
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, (title, runs) in zip(axes[0], panels):
    for i, (name, metrics_path) in enumerate(runs.items()):
      records = metrics.read_jsonl(metrics_path)
      for split, style in (('train', dict(alpha=0.4, lw=1)),
                           ('val', dict(marker='o', ms=3, lw=1.5))):
        points = [(r['step'], r['bpb']) for r in records if r['split'] == split]
        if points:
          steps, bpb = zip(*points)
          ax.plot(steps, bpb, color=f'C{i}', **style,
                  label=f'{_LABELS.get(name, name)} {split}')
    ax.set_xlabel('step')
    ax.set_ylabel('bits per byte')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with atomic.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100, format='png')


def lora_label(config: ml_collections.ConfigDict) -> str:
  """``'LoRA r=16 (+ head/.*, 1-D params)'``: the LoRA row's name in the table."""
  extra = list(config.full) + (['1-D params'] if config.tune_vectors else [])
  return f'LoRA r={config.rank}' + (f" (+ {', '.join(extra)})" if extra else '')


def write(config: ml_collections.ConfigDict, workdir: str,
          results: Sequence[dict[str, Any]]) -> str:
  """Writes ``results.md``, ``results.json`` and ``curves.png`` to ``workdir``.

  Args:
    config: the fine-tuning config.
    workdir: the fine-tuning workdir (each method's metrics in ``<method>/``,
      pretraining's in ``base/``).
    results: the base's record, then one per method.

  Returns:
    The table (markdown).
  """
  labels = {'lora': lora_label(config.lora)}
  if 'qlora' in config:
    q = config.qlora
    labels['qlora'] = (f"QLoRA {q.quantize.upper()}{' + double quant' if q.double_quant else ''}"
                       f", {lora_label(config.lora)}")
  text = table(results, config.domain, labels)
  atomic.write_text(os.path.join(workdir, RESULTS_MD), text)
  atomic.write_json(os.path.join(workdir, RESULTS_JSON), list(results))
  panels = [(f'fine-tuning on {config.domain!r} (val at step 0: the base)',
             {m: os.path.join(workdir, m, metrics.FILE) for m in config.methods})]
  if not config.base_checkpoint:
    panels.insert(0, (f'pretraining the base on {config.pretrain.domain!r}',
                      {'pretrain': os.path.join(workdir, 'base', metrics.FILE)}))
  plot(panels, os.path.join(workdir, CURVES))
  return text
