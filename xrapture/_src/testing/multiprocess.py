"""Runs Python in fresh processes, bounded in time: for jax.distributed tests.

A test starts its workers with :func:`run_group` (each a fresh interpreter,
so ``jax.distributed.initialize`` comes before any backend) and reads what
they wrote. Nothing waits without a deadline: a group is killed at its
deadline, and as soon as one worker fails the others get a short grace
period and are killed too (they would otherwise wait on a collective that
can never complete). A failure names each worker's exit status and the tail
of its output.

Inside a worker, :func:`initialize_from_env` joins the group that
:func:`worker_env` described.
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence

from xrapture._src import distributed

_COORDINATOR = "XRAPTURE_TEST_COORDINATOR"
_NUM_PROCESSES = "XRAPTURE_TEST_NUM_PROCESSES"
_PROCESS_ID = "XRAPTURE_TEST_PROCESS_ID"
_INIT_TIMEOUT = "XRAPTURE_TEST_INIT_TIMEOUT_S"


@dataclasses.dataclass
class Result:
  """How one process ended.

  Attributes:
    returncode: its exit status; negative: killed by that signal.
    output: its stdout and stderr, interleaved.
    seconds: wall time from start to exit (or kill).
    killed: True if it was killed (deadline, or another worker failed).
  """
  returncode: int
  output: str
  seconds: float
  killed: bool = False

  def tail(self, lines: int = 25) -> str:
    return "\n".join(self.output.rstrip().splitlines()[-lines:])


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Small test programs: XLA's CPU compile time dominates, and these halve it.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


def worker_env(process_id: int, num_processes: int, port: int, local_devices: int,
               extra: Mapping[str, str] | None = None,
               init_timeout_s: int = 60) -> dict[str, str]:
  """The environment of one worker: CPU devices, and whom to join."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": (f"--xla_force_host_platform_device_count={local_devices} "
                    + FAST_COMPILE_XLA_FLAGS),
      _COORDINATOR: f"127.0.0.1:{port}",
      _NUM_PROCESSES: str(num_processes),
      _PROCESS_ID: str(process_id),
      _INIT_TIMEOUT: str(init_timeout_s),
  })
  env.update(extra or {})
  return env


def initialize_from_env() -> tuple[int, int]:
  """In a worker: joins the group ``worker_env`` describes.

  Call it before anything initializes a JAX backend. With one process it
  only returns.

  Returns:
    ``(process_id, num_processes)``.
  """
  num_processes = int(os.environ.get(_NUM_PROCESSES, "1"))
  process_id = int(os.environ.get(_PROCESS_ID, "0"))
  if num_processes > 1:
    distributed.initialize(os.environ[_COORDINATOR], num_processes, process_id,
                           timeout_s=float(os.environ.get(_INIT_TIMEOUT, "60")))
  return process_id, num_processes


def _kill(proc: subprocess.Popen) -> None:
  """Kills ``proc`` and everything it started (its own process group)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


def run_group(argvs: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]],
              timeout_s: float, grace_s: float = 10.0) -> list[Result]:
  """Starts every ``argvs[i]`` with ``envs[i]``; returns when all have ended.

  Args:
    argvs: one command line per process.
    envs: one environment per process.
    timeout_s: the deadline for the whole group; then every process left is
      killed.
    grace_s: once a process fails (non-zero exit), how long the others get
      before they are killed.

  Returns:
    One Result per process, in order.
  """
  if len(argvs) != len(envs):
    raise ValueError(f"{len(argvs)} command lines but {len(envs)} environments")
  start = time.monotonic()
  deadline = start + timeout_s
  logs = [tempfile.TemporaryFile(mode="w+b") for _ in argvs]
  procs = [subprocess.Popen(list(argv), env=dict(env), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
           for argv, env, log in zip(argvs, envs, logs)]
  ended: dict[int, float] = {}
  killed: set[int] = set()
  try:
    while len(ended) < len(procs):
      now = time.monotonic()
      for i, proc in enumerate(procs):
        if i not in ended and proc.poll() is not None:
          ended[i] = now - start
          if proc.returncode != 0:
            deadline = min(deadline, now + grace_s)
      if now >= deadline:
        for i, proc in enumerate(procs):
          if i not in ended:
            _kill(proc)
            ended[i] = now - start
            killed.add(i)
        break
      time.sleep(0.05)
  finally:
    for i, proc in enumerate(procs):
      if proc.poll() is None:
        _kill(proc)
        killed.add(i)
  results = []
  for i, (proc, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    output = log.read().decode("utf-8", "replace")
    log.close()
    results.append(Result(proc.returncode, output, ended.get(i, 0.0), i in killed))
  return results


def describe(results: Sequence[Result], lines: int = 25) -> str:
  """Each process's exit status and the tail of its output, for a failure message."""
  parts = []
  for i, r in enumerate(results):
    how = "killed" if r.killed else f"exit status {r.returncode}"
    parts.append(f"--- process {i}: {how} after {r.seconds:.1f} s ---\n{r.tail(lines)}")
  return "\n".join(parts)


def check(results: Sequence[Result]) -> None:
  """Raises AssertionError unless every process exited with status 0."""
  if any(r.returncode != 0 or r.killed for r in results):
    raise AssertionError("a worker failed:\n" + describe(results))


def python_command(script: str, *args: str) -> list[str]:
  """``[python, script, *args]`` with this interpreter, unbuffered."""
  return [sys.executable, "-u", script, *args]
