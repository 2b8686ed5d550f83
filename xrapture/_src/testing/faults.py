"""Fault injection on the library: damage never turns into a silent change.

Each case damages a saved adapter file (one bit flipped in its header or its
data, a truncation), makes a write fail (read-only target, full disk, failed
fsync or rename), races writers and readers on one file, kills a writing
process (SIGKILL), or passes a bad config value; its outcome is one of:

* ``same``: the file loads to exactly the values that were saved (or, for a
  failed write, the previous file is intact and loads exactly);
* ``refused``: a ValueError or OSError whose message names the file (for
  config values: a ValueError naming the field);
* ``unclear``: an error that names neither, or another exception type;
* ``silent``: different values load with no error, or a bad config value is
  accepted: what must never happen.

:func:`run` gives the counts per kind and outcome; ``tools/fault_inject.py``
prints them as a table, ``xrapture_test/faults_test.py`` runs a bounded pass.
"""

import collections
import contextlib
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, ContextManager, Iterator
from unittest import mock
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.io import adapter
from xrapture._src.io import atomic
from xrapture._src.lora import lora_weight
from xrapture._src.transform import adapters
from xrapture._src.transform import config as config_lib

LoraWeight = lora_weight.LoraWeight
OUTCOMES = ("same", "refused", "unclear", "silent")
BAD = ("unclear", "silent")

# (field, value) pairs that must each be refused naming the field.
BAD_CONFIG_VALUES = (
    ("rank", 0), ("rank", -1), ("alpha", 0.0), ("alpha", float("nan")),
    ("alpha", float("inf")), ("alpha", -float("inf")), ("init_stddev", 0.0),
    ("init_stddev", -0.0), ("init_stddev", float("nan")), ("init_stddev", float("inf")),
    ("init_stddev", -0.01), ("dropout", 1.0), ("dropout", 1.5), ("dropout", -0.1),
    ("dropout", float("nan")), ("dtype", "int8"), ("dtype", "int32"), ("dtype", "bool"),
    ("dtype", "uint16"), ("dtype", "complex64"), ("dtype", "float33"),
    ("targets", ("(",)), ("targets", (".*/w", "[")), ("full", ("*",)),
    ("rank_pattern", (("(", 2),)), ("rank_pattern", ((".*", -1),)),
    ("rank_pattern", ((".*", 2.5),)), ("alpha_pattern", ((")", 2.0),)),
    ("alpha_pattern", ((".*", 0.0),)), ("alpha_pattern", ((".*", float("nan")),)),
)


@dataclasses.dataclass
class Report:
  """Outcome counts per case kind, with one example message for each."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

  def add(self, kind: str, outcome: str, detail: str = "") -> None:
    self.counts[(kind, outcome)] += 1
    self.examples.setdefault((kind, outcome), detail)

  def total(self, kind: str) -> int:
    return sum(n for (k, _), n in self.counts.items() if k == kind)

  def bad(self) -> dict[tuple[str, str], str]:
    """``(kind, outcome) -> example`` for every unclear or silent outcome."""
    return {key: self.examples[key] for key in self.counts if key[1] in BAD}

  def table(self) -> str:
    """A markdown table: kind, cases, and the count of each outcome."""
    kinds = list(dict.fromkeys(k for k, _ in self.counts))
    lines = ["| kind | cases | " + " | ".join(OUTCOMES) + " |",
             "|---|---:|" + "---:|" * len(OUTCOMES)]
    for kind in kinds:
      cells = [str(self.counts.get((kind, o), 0)) for o in OUTCOMES]
      lines.append(f"| {kind} | {self.total(kind)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# A small adapter with every kind of entry: float32 and bfloat16 factors, a
# conv-like 3-D kernel, full-trained kernel and vector, rsLoRA.


def example(seed: int = 0) -> tuple[Any, Any, Any]:
  """``(base, params, lora_spec)``: trained-looking adapters (non-zero b)."""
  rng = np.random.default_rng(seed)

  def f(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)
  base = {"lin": {"w": f(6, 5), "b": f(5)},
          "conv": {"w": f(3, 4, 5)},
          "half": {"w": f(5, 4, dtype=jnp.bfloat16)},
          "head": {"w": f(5, 2)},
          "step": {"n": jnp.arange(2, dtype=jnp.int32)}}
  params = {"lin": {"w": LoraWeight(base["lin"]["w"], f(2, 5), f(6, 2), alpha=4.0),
                    "b": f(5)},
            "conv": {"w": LoraWeight(base["conv"]["w"], f(1, 3, 5), f(3, 4, 3),
                                     alpha=2.0, rslora=True)},
            "half": {"w": LoraWeight(base["half"]["w"], f(2, 4, dtype=jnp.bfloat16),
                                     f(5, 2, dtype=jnp.bfloat16), alpha=1.0)},
            "head": {"w": f(5, 2)},
            "step": base["step"]}
  full, freeze = lora_weight.LORA_FULL, lora_weight.LORA_FREEZE
  lora_spec = {"lin": {"w": 2, "b": full}, "conv": {"w": 3}, "half": {"w": 2},
               "head": {"w": full}, "step": {"n": freeze}}
  return base, params, lora_spec


def _bits(x: Any) -> bytes:
  return np.asarray(x).tobytes() + str(np.asarray(x).dtype).encode() + str(np.shape(x)).encode()


def identical(loaded: Any, expected: Any) -> bool:
  """Same tree, LoraWeights with bit-identical factors, alpha and rslora."""
  is_lora = lambda x: isinstance(x, LoraWeight)
  got, got_def = jax.tree_util.tree_flatten(loaded, is_leaf=is_lora)
  want, want_def = jax.tree_util.tree_flatten(expected, is_leaf=is_lora)
  if got_def != want_def:  # type: ignore[operator]  # jaxlib 0.10 has no PyTreeDef stub
    return False
  for x, y in zip(got, want):
    if is_lora(x) != is_lora(y):
      return False
    if is_lora(x):
      if (x.alpha, x.rslora) != (y.alpha, y.rslora) or type(x.alpha) is not type(y.alpha):
        return False
      if any(_bits(getattr(x, n)) != _bits(getattr(y, n)) for n in ("w", "a", "b")):
        return False
    elif _bits(x) != _bits(y):
      return False
  return True


def _expected(base: Any, params: Any) -> Any:
  """What load_adapter gives for ``params`` saved and loaded onto ``base``."""
  def one(b, p):
    if isinstance(p, LoraWeight):
      return LoraWeight(b, p.a, p.b, alpha=p.alpha, rslora=p.rslora, layout=p.layout)
    return p
  return jax.tree.map(one, base, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def _load_outcome(path: str, base: Any, expected: Any) -> tuple[str, str]:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      loaded = adapter.load_adapter(path, base)
  except (ValueError, OSError) as e:
    message = f"{type(e).__name__}: {e}"
    return ("refused" if path in str(e) else "unclear"), message
  except Exception as e:  # pylint: disable=broad-except
    return "unclear", f"{type(e).__name__}: {e}"
  return ("same" if identical(loaded, expected) else "silent"), "loaded"


# ----------------------------------------------------------------------------
# Damaged files.


def header_size(data: bytes) -> int:
  """Bytes of a safetensors file before its tensor data."""
  return 8 + int.from_bytes(data[:8], "little")


def flip_bits(report: Report, directory: str, count: int, region: str,
              rng: np.random.Generator) -> None:
  """``count`` files, each one random bit flipped in ``region`` (header/data)."""
  base, params, lora_spec = example()
  path = os.path.join(directory, f"flip-{region}.safetensors")
  adapter.save_adapter(path, params, lora_spec)
  with open(path, "rb") as f:
    data = f.read()
  start, stop = (0, header_size(data)) if region == "header" else (header_size(data), len(data))
  expected = _expected(base, params)
  for _ in range(count):
    damaged = bytearray(data)
    offset = int(rng.integers(start, stop))
    damaged[offset] ^= 1 << int(rng.integers(8))
    with open(path, "wb") as f:
      f.write(damaged)
    report.add(f"{region} bit flip", *_load_outcome(path, base, expected))


def truncate(report: Report, directory: str, count: int, rng: np.random.Generator) -> None:
  """``count`` truncations at random lengths, plus empty and one byte short."""
  base, params, lora_spec = example()
  path = os.path.join(directory, "truncated.safetensors")
  adapter.save_adapter(path, params, lora_spec)
  with open(path, "rb") as f:
    data = f.read()
  expected = _expected(base, params)
  lengths = [0, len(data) - 1] + [int(n) for n in rng.integers(0, len(data), count)]
  for n in lengths[:max(count, 2)]:
    with open(path, "wb") as f:
      f.write(data[:n])
    report.add("truncation", *_load_outcome(path, base, expected))


# ----------------------------------------------------------------------------
# Failed writes: the error names the file and the previous file is intact.


class _FullDiskFile:
  """A file whose write stores half the data, then fails with ENOSPC."""

  def __init__(self, path, mode="wb"):
    self._f = open(path, mode)  # pylint: disable=consider-using-with

  def write(self, data):
    self._f.write(data[:len(data) // 2])
    self._f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()
    return False


def _raise(code: int) -> Callable[..., Any]:
  def fail(*args, **kwargs):
    del args, kwargs
    raise OSError(code, os.strerror(code))
  return fail


@contextlib.contextmanager
def _read_only(directory: str) -> Iterator[None]:
  """A read-only directory; for root (whom modes do not stop), EACCES on create."""
  os.chmod(directory, 0o555)
  try:
    if os.geteuid() == 0:
      with mock.patch.object(atomic.tempfile, "mkstemp", _raise(errno.EACCES)):
        yield
    else:
      yield
  finally:
    os.chmod(directory, 0o755)


_WRITE_FAULTS: dict[str, Callable[[str], ContextManager[Any]]] = {
    "read-only target": lambda directory: _read_only(directory),
    "disk full (ENOSPC on write)": lambda _: mock.patch.object(
        atomic, "open", _FullDiskFile, create=True),
    "failed fsync (EIO)": lambda _: mock.patch.object(atomic.os, "fsync", _raise(errno.EIO)),
    "failed rename (EXDEV)": lambda _: mock.patch.object(
        atomic.os, "replace", _raise(errno.EXDEV)),
}


def failed_writes(report: Report, directory: str, count: int) -> None:
  """Each write fault ``count`` times, over an existing file and a new one."""
  base, params, lora_spec = example()
  _, other, _ = example(seed=1)
  for kind, fault in _WRITE_FAULTS.items():
    for i in range(count):
      sub = os.path.join(directory, f"write-{len(report.counts)}-{i}")
      os.makedirs(sub)
      path = os.path.join(sub, "adapter.safetensors")
      existing = i % 2 == 0
      if existing:
        adapter.save_adapter(path, params, lora_spec)
      try:
        with fault(sub):
          adapter.save_adapter(path, other, lora_spec)
      except OSError as e:
        message = f"{type(e).__name__}: {e}"
        outcome = "refused" if path in str(e) else "unclear"
      except Exception as e:  # pylint: disable=broad-except
        report.add(kind, "unclear", f"{type(e).__name__}: {e}")
        continue
      else:
        report.add(kind, "silent", "the write reported success")
        continue
      leftovers = sorted(set(os.listdir(sub)) - {"adapter.safetensors"})
      if leftovers:
        report.add(kind, "unclear", f"temporary files left: {leftovers}")
      elif existing:
        previous, detail = _load_outcome(path, base, _expected(base, params))
        if previous != "same":  # the failed write damaged the previous file
          report.add(kind, "silent", f"previous file: {previous}: {detail}")
        else:
          report.add(kind, outcome, message)
      elif os.path.exists(path):
        report.add(kind, "silent", "a file appeared although the write failed")
      else:
        report.add(kind, outcome, message)


# ----------------------------------------------------------------------------
# Concurrent writers, with a reader.


def concurrent_writers(report: Report, directory: str, writers: int, rounds: int) -> None:
  """``writers`` threads save different adapters to one path while one reads.

  Every read must give exactly one writer's values; at the end no temporary
  file may be left.
  """
  base, _, lora_spec = example()
  versions = [example(seed=s)[1] for s in range(writers)]
  expected = [_expected(base, v) for v in versions]
  path = os.path.join(directory, "raced.safetensors")
  adapter.save_adapter(path, versions[0], lora_spec)
  done = threading.Event()
  errors: list[str] = []
  reads: list[tuple[str, str]] = []  # (outcome, detail)

  def write(k):
    try:
      for _ in range(rounds):
        adapter.save_adapter(path, versions[k], lora_spec)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{type(e).__name__}: {e}")

  def read():
    while not done.is_set() or not reads:
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          loaded = adapter.load_adapter(path, base)
      except Exception as e:  # pylint: disable=broad-except
        reads.append(("refused" if path in str(e) else "unclear", f"{type(e).__name__}: {e}"))
        continue
      matches = any(identical(loaded, e) for e in expected)
      reads.append(("same" if matches else "silent", "loaded"))

  threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
  reader = threading.Thread(target=read)
  reader.start()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  done.set()
  reader.join()
  for message in errors:
    report.add("concurrent writers (writes)", "unclear", message)
  report.counts[("concurrent writers (writes)", "same")] += writers * rounds - len(errors)
  report.examples.setdefault(("concurrent writers (writes)", "same"), "written")
  for outcome, detail in reads:
    report.add("concurrent writers (reads)", outcome, detail)
  leftovers = sorted(set(os.listdir(directory)) - {"raced.safetensors"})
  leftovers = [n for n in leftovers if n.startswith(".tmp-raced")]
  if leftovers:
    report.add("concurrent writers (writes)", "unclear", f"temporary files left: {leftovers}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    final = adapter.load_adapter(path, base)
  report.add("concurrent writers (final file)",
             "same" if any(identical(final, e) for e in expected) else "silent")


# ----------------------------------------------------------------------------
# A writer killed (SIGKILL) in the middle of saving.


def write_forever(path: str) -> None:
  """Saves two adapters in turn to ``path`` until killed (a child process)."""
  _, params0, lora_spec = example(seed=0)
  _, params1, _ = example(seed=1)
  adapter.save_adapter(path, params0, lora_spec)
  print("ready", flush=True)
  while True:
    for params in (params1, params0):
      adapter.save_adapter(path, params, lora_spec)


def killed_writers(report: Report, directory: str, count: int,
                   rng: np.random.Generator) -> None:
  """``count`` child processes saving in a loop, each killed at a random time.

  The file must then load to exactly one of the two adapters. Temporary
  files a kill leaves behind are reported in the example text, not as a
  failure: they are never read.
  """
  base = example()[0]
  expected = [_expected(base, example(seed=s)[1]) for s in (0, 1)]
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.dirname(os.path.abspath(__file__)))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [package_root] + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
             JAX_PLATFORMS="cpu")
  for i in range(count):
    path = os.path.join(directory, f"killed-{i}.safetensors")
    child = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", "import sys; from xrapture._src.testing import faults; "
         "faults.write_forever(sys.argv[1])", path],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None  # stdout=PIPE
    try:
      if child.stdout.readline().strip() != "ready":
        report.add("kill -9 during save", "unclear", "the writer did not start")
        continue
      time.sleep(float(rng.uniform(0.0, 0.5)))
    finally:
      child.send_signal(signal.SIGKILL)
      child.wait()
      child.stdout.close()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        loaded = adapter.load_adapter(path, base)
      except Exception as e:  # pylint: disable=broad-except
        report.add("kill -9 during save", "refused" if path in str(e) else "unclear",
                   f"{type(e).__name__}: {e}")
        continue
    leftovers = [n for n in os.listdir(directory)
                 if n.startswith(f".tmp-killed-{i}.safetensors")]
    same = any(identical(loaded, e) for e in expected)
    report.add("kill -9 during save", "same" if same else "silent",
               f"temporary files left by the kill: {len(leftovers)}")


# ----------------------------------------------------------------------------
# Bad config values.


def bad_configs(report: Report) -> None:
  """Every value of :data:`BAD_CONFIG_VALUES` at ``model.lora_spec``/``adapt``'s entry."""
  base, _, _ = example()
  base = {k: v for k, v in base.items() if k != "step"}
  for field, value in BAD_CONFIG_VALUES:
    config = config_lib.default_config()
    config.rank = 2
    setattr(config, field, value)
    try:
      adapters.lora_spec_from_config(base, config)
    except ValueError as e:
      report.add("bad config value", "refused" if f"config.{field}" in str(e) else "unclear",
                 str(e))
    except Exception as e:  # pylint: disable=broad-except
      report.add("bad config value", "unclear", f"{type(e).__name__}: {e}")
    else:
      report.add("bad config value", "silent", f"accepted config.{field} = {value!r}")


def run(header_flips: int = 100, data_flips: int = 100, truncations: int = 20,
        write_faults: int = 2, writers: int = 4, rounds: int = 5, kills: int = 0,
        seed: int = 0) -> Report:
  """One fault-injection pass in a temporary directory.

  Returns:
    The outcome counts; ``report.bad()`` lists what must be empty.
  """
  report = Report()
  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory() as directory:
    flip_bits(report, directory, header_flips, "header", rng)
    flip_bits(report, directory, data_flips, "data", rng)
    truncate(report, directory, truncations, rng)
    failed_writes(report, directory, write_faults)
    concurrent_writers(report, directory, writers, rounds)
    killed_writers(report, directory, kills, rng)
  bad_configs(report)
  return report
