"""Fault injection on the xrapture library: prints outcome counts per fault kind.

  PYTHONPATH=. python tools/fault_inject.py --header_flips=300 --data_flips=300

Damages saved adapter files (bit flips in header and data, truncations),
fails writes (read-only target, full disk, fsync, rename), races writers and
a reader, kills writing processes, and tries bad config values (see
xrapture/_src/testing/faults.py).
Exits 1 if any case ended in an unclear error or a silent change.
"""

import argparse
import sys

from xrapture._src.testing import faults


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--header_flips", type=int, default=300)
  parser.add_argument("--data_flips", type=int, default=300)
  parser.add_argument("--truncations", type=int, default=50)
  parser.add_argument("--write_faults", type=int, default=4)
  parser.add_argument("--writers", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--kills", type=int, default=10,
                      help="writer processes killed (SIGKILL) mid-save; each "
                      "starts a Python process")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  report = faults.run(**vars(args))
  print(report.table())
  bad = report.bad()
  for (kind, outcome), example in sorted(bad.items()):
    print(f"\n{outcome} ({kind}), e.g.: {example}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
