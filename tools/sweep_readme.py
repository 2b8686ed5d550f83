"""Puts a sweep's table (from its sweep.json) into the README, between the markers.

  python tools/sweep_readme.py /path/to/sweep-workdir/sweep.json

Replaces what lies between ``<!-- sweep table -->`` and
``<!-- end sweep table -->`` in README.md (or ``--readme``) with the table
experiments/sweep_report.py renders, so the README shows the numbers the
sweep wrote, not numbers typed by hand.
"""

import argparse
import json
import os
import pathlib
import sys

# Run as a script: the repository root, appended (experiments/, configs/ and
# benchmarks/ come from this checkout; an installed xrapture wins over the checkout's).
if not __package__:
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import sweep_report  # pylint: disable=g-import-not-at-top,wrong-import-position

BEGIN = '<!-- sweep table -->'
END = '<!-- end sweep table -->'


def render(readme: str, record: dict) -> str:
  """``readme`` with the text between the markers replaced by the sweep's table.

  Raises:
    ValueError: the markers are missing or out of order.
  """
  start, end = readme.find(BEGIN), readme.find(END)
  if start < 0 or end < start:
    raise ValueError(f'The README has no {BEGIN} ... {END} block to put the table in.')
  return (readme[:start + len(BEGIN)] + '\n' + sweep_report.table(record)
          + readme[end:])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sweep_json', help="a sweep workdir's sweep.json")
  parser.add_argument('--readme', default=str(pathlib.Path(__file__).resolve().parents[1]
                                              / 'README.md'))
  args = parser.parse_args(argv)
  with open(args.sweep_json, encoding='utf-8') as f:
    record = json.load(f)
  path = pathlib.Path(args.readme)
  path.write_text(render(path.read_text(encoding='utf-8'), record), encoding='utf-8')
  print(f'{path}: sweep table from {args.sweep_json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
