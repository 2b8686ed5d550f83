"""The sweep's report: its table (markdown, JSON) and its plot (PNG).

The record (``sweep.json``, what :func:`experiments.sweeping.run` returns)
holds the base's row, the full fine-tunes, one row per point, the skipped
points and the parameter budget; :func:`table` renders it, and
tools/sweep_readme.py puts that table in the README.
"""

import os
from typing import Any

from experiments import atomic

SWEEP_MD = 'sweep.md'
SWEEP_JSON = 'sweep.json'
SWEEP_PNG = 'sweep.png'


def _ms(seconds: float | None) -> str:
  return '–' if seconds is None else f'{seconds * 1000:.0f} ms'


def table(record: dict[str, Any]) -> str:
  """The markdown table: the base, each full fine-tune, each point in run order.

  The best point within the budget is in bold; points over it are marked.
  """
  base = record['base']
  lines = [
      '| run | stage | val bits/byte | test bits/byte | share of full\'s gain '
      '| trainable params (share of full\'s) | step time |',
      '|---|---|---|---|---|---|---|',
      f"| base (no fine-tune) | – | {base['val_bpb']:.3f} | {base['test_bpb']:.3f} "
      '| – | 0 | – |',
  ]
  for full in record['full']:
    lines.append(
        f"| full fine-tune ({full['name']}) | reference | {full['val_bpb']:.3f} "
        f"| {full['test_bpb']:.3f} | 100% | {full['trainable_params']:,} (100%) "
        f"| {_ms(full.get('step_time_s'))} |")
  for row in record['points']:
    name = f"LoRA {row['name']}"
    if row['name'] == record.get('best'):
      name = f'**{name}** (best)'
    share = row['share_of_full_gain']
    over = '' if row['within_budget'] else ', over budget'
    lines.append(
        f"| {name} | {row['stage']} | {row['val_bpb']:.3f} | {row['test_bpb']:.3f} "
        f"| {'–' if share is None else f'{share:.1%}'} "
        f"| {row['trainable_params']:,} ({row['param_fraction']:.1%}{over}) "
        f"| {_ms(row.get('step_time_s'))} |")
  for row in record.get('skipped', []):
    lines.append(f"| LoRA {row['name']} | {row['stage']} | skipped: {row['reason']} "
                 '| | | | |')
  lines.append('')
  lines.append(f"Budget: at most {record['budget']:,} trainable parameters "
               f"({record['max_trainable_fraction']:.0%} of full fine-tuning's). "
               'Share of full\'s gain: (base − LoRA) / (base − full) in val '
               'bits/byte, against the full fine-tune with the same schedule.')
  return '\n'.join(lines) + '\n'


def plot(record: dict[str, Any], path: str) -> None:
  """Val bits/byte against trainable parameters, one colour per stage."""
  # Imported here: the launcher's other processes, and runs that fail
  # before the report, do not pay its start-up.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(8, 5))  # no pyplot: no global state
  ax = fig.subplots()
  base = record['base']['val_bpb']
  # Points worse than the base (a diverged run) sit on the top edge, marked
  # with their value, so that they do not squash the others.
  values = [r['val_bpb'] for r in record['points']] + [f['val_bpb'] for f in record['full']]
  top = base + 0.1 * (base - min(values, default=base))
  stages = list(dict.fromkeys(r['stage'] for r in record['points']))
  for i, stage in enumerate(stages):
    rows = [r for r in record['points'] if r['stage'] == stage]
    shown = [min(r['val_bpb'], top) for r in rows]
    ax.scatter([r['trainable_params'] for r in rows], shown, color=f'C{i}',
               marker='o', label=f'LoRA: {stage}', zorder=3)
    for r, y in zip(rows, shown):
      off = r['val_bpb'] > top
      text = f"{r['name']} ({r['val_bpb']:.2f}, off the chart)" if off else r['name']
      ax.annotate(text, (r['trainable_params'], y), fontsize=6,
                  xytext=(3, -9 if off else 3), textcoords='offset points')
  for full in record['full']:
    ax.scatter([full['trainable_params']], [full['val_bpb']], marker='*', s=120,
               color='k', label=f"full fine-tune ({full['name']})", zorder=3)
  reference = record['full'][0]['val_bpb'] if record['full'] else None
  ax.axhline(base, color='grey', ls=':', label='base (no fine-tune)')
  if reference is not None:
    ax.axhline(base - 0.95 * (base - reference), color='green', ls='--', lw=1,
               label="95% of full's gain")
  ax.axvline(record['budget'], color='red', ls='--', lw=1, label='parameter budget')
  ax.set_ylim(top=top + 0.02 * (top - min(values, default=base)))
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel('val bits per byte')
  ax.set_title('LoRA sweep: val bits/byte vs trainable parameters')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100, format='png')


def write(workdir: str, record: dict[str, Any]) -> str:
  """Writes ``sweep.md``, ``sweep.json`` and ``sweep.png`` to ``workdir``; returns the table."""
  text = table(record)
  atomic.write_text(os.path.join(workdir, SWEEP_MD), text)
  atomic.write_json(os.path.join(workdir, SWEEP_JSON), record)
  plot(record, os.path.join(workdir, SWEEP_PNG))
  return text
