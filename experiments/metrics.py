"""``metrics.jsonl``: one JSON record per logged step, appended as training goes.

The trainer writes it (:class:`Writer`), the report reads it
(:func:`read_jsonl`); records look like
``{"run": "lora", "step": 300, "split": "val", "loss": 1.4, "bpb": 2.0}``.
"""

import json
import os
from typing import Any

from absl import logging

from experiments import atomic

FILE = 'metrics.jsonl'


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file; lines that do not parse are dropped with a warning.

  A run killed mid-write leaves a partial last line.
  """
  if not os.path.exists(path):
    return []
  records, bad = [], []
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict):
        records.append(record)
      else:
        bad.append(number)
  if bad:
    logging.warning('%s: dropping line(s) %s, which do not parse (a write cut '
                    'short by a kill?).', path, bad)
  return records


class Writer:
  """Appends JSON records to ``<workdir>/metrics.jsonl``.

  On resume from step ``resume_step``, records of later steps (written by
  the interrupted run after its last checkpoint) are dropped, and so are all
  records when there was no checkpoint yet, so the file reads as if the run
  had not been interrupted.
  """

  def __init__(self, path: str, resume_step: int, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    if not enabled:
      return
    kept = [r for r in read_jsonl(path)
            if resume_step and r.get('step', 0) <= resume_step]
    atomic.write_text(path, ''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept))

  def write(self, **record) -> None:
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, sort_keys=True) + '\n')
