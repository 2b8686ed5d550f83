"""Writing results: a JSON file and a markdown table beside it."""

import json
import os
from typing import Any, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(x):
    if isinstance(x, float):
      return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)
  lines = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def met(value: float, target: Any) -> str:
  """A table's met cell: ``target`` a bound (≤), a ``[low, high]`` range, or None."""
  if target is None:
    return ""
  if isinstance(target, (list, tuple)):
    return "yes" if target[0] <= value <= target[1] else "**no**"
  return "yes" if value <= target else "**no**"


def median_iqr(ratio: dict[str, float]) -> str:
  """A paired ratio's median and interquartile range: ``1.05 (1.04–1.06)``."""
  return f"{ratio['median']:.2f} ({ratio['q1']:.2f}–{ratio['q3']:.2f})"


def environment_line(env: dict[str, Any]) -> str:
  versions = ", ".join(f"{k} {env[k]}" for k in
                       ("jax", "jaxlib", "haiku", "optax", "torch", "peft")
                       if env.get(k))
  load = env.get("loadavg_start"), env.get("loadavg_end")
  allocator = (f" · malloc: {env['allocator']}"
               if env.get("allocator") not in (None, "default") else "")
  return (f"{env['date']} · {env['machine']} · backend {env['backend']} "
          f"({env['device']}) · Python {env['python']} · {versions} · "
          f"load average (1/5/15 min) at start {load[0]}, at end {load[1]}{allocator}")


def publish(out: str | None, name: str, data: dict[str, Any], markdown: str) -> tuple[str, str]:
  """Writes a benchmark's results (``out``, default ``results/<name>.json``), prints them.

  Returns the JSON and markdown paths :func:`write` wrote.
  """
  paths = write(out or os.path.join(RESULTS_DIR, f"{name}.json"), data, markdown)
  print(markdown)
  print("\nwrote", *paths)
  return paths


def write(path: str, data: dict[str, Any], markdown: str) -> tuple[str, str]:
  """Writes ``path`` (JSON) and the same path with ``.md``; returns both."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True, default=str)
  md_path = os.path.splitext(path)[0] + ".md"
  with open(md_path, "w") as f:
    f.write(markdown.rstrip() + "\n")
  return path, md_path
