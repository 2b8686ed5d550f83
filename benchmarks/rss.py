"""Resident memory of this process: current, peak, and a peak reset (Linux)."""

import ctypes
import os
import resource


def max_rss_bytes() -> int:
  """The process's peak resident set size (``ru_maxrss``, KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
  """The current resident set size."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
  """Resets the process's peak RSS (VmHWM, ru_maxrss); False where Linux won't.

  First hands the heap that the compiler freed back to the OS (glibc's
  ``malloc_trim``): it would otherwise stay resident and count as training
  memory.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def step_net(child: dict) -> int | None:
  """A measured child's steady-state step peak net of its runtime, or None if unmeasured.

  ``step_peak_rss`` (peak RSS over the steady steps) less ``baseline_rss``
  (RSS after the imports), as the memory benchmarks' children record them.
  """
  if "step_peak_rss" not in child:
    return None
  return child["step_peak_rss"] - child["baseline_rss"]
