"""Paired alternation, medians of ratios, and the machine a result came from.

On a shared, noisy machine a median of absolute times drifts with the load;
the ratio of two variants timed back to back in the same round does not. So
every benchmark here runs its variants in rounds (rotating the order each
round), and reports for each pair the median over rounds of
``time[a] / time[b]``.
"""

import ctypes
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping


def alternate(steps: Mapping[str, Callable[[], Any]], rounds: int,
              warmup: int = 2) -> dict[str, list[float]]:
  """Seconds per call of each step, ``rounds`` rounds, one call each a round.

  Each step must block until its work is done (``jax.block_until_ready``).
  The order rotates every round so that no variant always follows the same
  one.
  """
  names = list(steps)
  for _ in range(warmup):
    for name in names:
      steps[name]()
  times = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      steps[name]()
      times[name].append(time.perf_counter() - start)
  return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
  if len(values) == 1:
    return values[0], values[0], values[0]
  q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return q1, q2, q3


def summarize(times: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
  """Median and quartiles of each step, in milliseconds."""
  out = {}
  for name, values in times.items():
    q1, q2, q3 = quartiles(values)
    out[name] = {"median_ms": 1e3 * q2, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
                 "min_ms": 1e3 * min(values), "n": len(values)}
  return out


def paired_ratio(times: Mapping[str, list[float]], num: str, den: str
                 ) -> dict[str, float]:
  """Median (and quartiles) over rounds of ``times[num][i] / times[den][i]``."""
  ratios = [a / b for a, b in zip(times[num], times[den])]
  q1, q2, q3 = quartiles(ratios)
  return {"median": q2, "q1": q1, "q3": q3, "n": len(ratios)}


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


_DISTRIBUTIONS = {"haiku": "dm-haiku"}


def _version(module: str) -> str | None:
  """The installed version, read from the metadata (importing peft takes seconds)."""
  try:
    return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
  except importlib.metadata.PackageNotFoundError:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod else None


def cpu_threads() -> int:
  """Cores this process may use: what XLA:CPU sizes its thread pool to."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ALLOCATOR: str | None = None


def steady_allocator() -> str | None:
  """Keeps freed memory in glibc's heap, so a step reuses its buffers' pages.

  XLA:CPU mallocs each step's temporaries anew, and glibc gives freed memory
  back to the kernel in two ways, after which every step page-faults it in
  again:

  * an allocation above the mmap threshold (at most 32 MiB) gets fresh pages
    and is unmapped on free: at d=256 xrapture's 38 MiB of temporaries cost
    ~9,800 faults a step and a third of its time, while the bound's 28 MiB
    stayed under the threshold;
  * XLA's worker threads allocate from their own arenas, whose heaps are
    mapped 64 MiB at a time and unmapped once wholly free: at d=512, r=32
    (70 MiB of temporaries) xrapture still faulted ~18,000 times a step with
    mmap off, the bound (59 MiB) about 140.

  Timing variants on either side of those lines compares the allocator, not
  the steps. This turns glibc's mmap off, its trimming down, and its arenas
  to one, the main heap (``mallopt``; the same as
  ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:glibc.malloc.arena_max=1``)
  for the whole process, torch's allocations included. Call it first thing,
  before any thread allocates.

  Returns:
    What was set (recorded by :func:`environment`), or None off glibc.
  """
  global _ALLOCATOR
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return None
  done = [label for param, value, label in ((_M_MMAP_MAX, 0, "mmap_max=0"),
                                            (_M_TRIM_THRESHOLD, 2**31 - 1, "trim_threshold=2 GiB"),
                                            (_M_ARENA_MAX, 1, "arena_max=1"))
          if mallopt(param, value)]
  _ALLOCATOR = "glibc " + ", ".join(done) if done else None
  return _ALLOCATOR


def environment() -> dict[str, Any]:
  """Machine, versions, date and load: what a reader needs to weigh a number."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  env = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": f"{_cpu_model()}, {cpu_threads()} cores",
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "backend": jax.default_backend(),
      "device": devices[0].device_kind,
      "device_count": len(devices),
      "loadavg_start": load_average(),
      "allocator": _ALLOCATOR or "default",
  }
  import xrapture  # pylint: disable=g-import-not-at-top
  env["xrapture"] = xrapture.__version__
  for module in ("jax", "jaxlib", "haiku", "optax", "torch", "peft", "numpy"):
    env[module] = _version(module)
  return env
