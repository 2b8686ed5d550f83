"""jax.distributed.initialize with clear errors, in bounded time.

JAX's own call, given a coordinator that never answers, aborts the process
after ``initialization_timeout`` with "another task died" and an RPC status;
given a process count that differs from the coordinator's, a process other
than 0 silently joins a group of another size. :func:`initialize` turns both
into Python exceptions that name the address, the counts and the fix.

:func:`avoid_cache_hang` turns JAX's persistent compilation cache off where
reading it hangs a multi-process CPU run; :func:`initialize` calls it, and a
caller of ``jax.distributed.initialize`` itself calls it right after.
"""

import logging
import socket
import time

import jax

# The first JAX release whose multi-process CPU runs (gloo collectives) hang
# on programs loaded from the persistent compilation cache: measured on jax
# 0.12.1 (a warm cache: both processes block in their first collective
# program), absent on 0.10.2, the newest release before 0.11, where the test
# command runs the same launcher with the cache on.
_CACHE_HANG_SINCE = (0, 11)


def _version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:2] if p.isdigit())


def avoid_cache_hang() -> bool:
  """Turns the persistent compilation cache off where it would hang this run.

  Call it after ``jax.distributed.initialize`` and before the first
  compilation (JAX decides whether to use the cache once, at its first
  compile). It acts only on a CPU run of several processes, with the cache
  configured (``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``),
  on jax >= 0.11: there, executables loaded from the cache never finish their
  cross-process collectives. It logs a warning saying so.

  Returns:
    Whether it turned the cache off.
  """
  # jax.config's options are attributes its type stub does not list.
  cache_dir = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
  enabled = jax.config.jax_enable_compilation_cache  # type: ignore[attr-defined]
  if (jax.process_count() == 1 or jax.default_backend() != "cpu"
      or _version() < _CACHE_HANG_SINCE or not enabled or not cache_dir):
    return False
  jax.config.update("jax_enable_compilation_cache", False)
  logging.warning(
      "xrapture: the persistent compilation cache (%s) is off for this run: "
      "on jax %s, a multi-process CPU run hangs in the first collective of a "
      "program loaded from it. Programs are compiled afresh.",
      cache_dir, jax.__version__)
  return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator_address={address!r} is not 'host:port'")
  deadline = time.monotonic() + timeout_s
  error = None
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)),
                                    timeout=max(0.1, min(1.0, timeout_s))):
        return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.1)
  raise TimeoutError(
      f"no coordinator answers at {address} after {timeout_s:g} s ({error}). "
      "Process 0 serves it: start process 0 too, with the same "
      "coordinator_address, or correct the address.")


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               *, timeout_s: float = 300, cpu_collectives: str | None = "gloo") -> None:
  """Joins a multi-process JAX run; call it before any JAX computation.

  Args:
    coordinator_address: ``host:port`` of the coordinator (process 0 serves it).
    num_processes: how many processes take part; every one must say the same.
    process_id: this process, ``0 <= process_id < num_processes``.
    timeout_s: how long to wait for the coordinator and the other processes.
    cpu_collectives: the CPU backend's collectives (``"gloo"``; JAX's CPU
      default does none across processes), or None to leave it as it is.

  Raises:
    ValueError: a process id outside ``[0, num_processes)``, a malformed
      address, or a coordinator that runs another number of processes.
    TimeoutError: no coordinator answers within ``timeout_s``.
    RuntimeError: a JAX backend is already initialized (JAX's message).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes="
                     f"{num_processes}).")
  if process_id != 0:
    _wait_for_coordinator(coordinator_address, timeout_s)
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=max(1, int(timeout_s)))
  if jax.process_count() != num_processes:
    raise ValueError(
        f"process {process_id} was started with num_processes={num_processes}, "
        f"but the coordinator at {coordinator_address} runs "
        f"{jax.process_count()} processes: give every process the same "
        "num_processes.")
  avoid_cache_hang()
