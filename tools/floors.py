"""Prints setup.py's lower bounds as pins, one per line: a pip constraints file.

    python tools/floors.py > floors.txt
    pip install -c floors.txt ".[tests]"   # the lowest versions setup.py admits

Reads ``install_requires`` (every entry must be ``name>=version``) and
``python_requires`` from setup.py's source, without running it. With
``--python``, prints the lowest Python instead (``3.11``).
"""

import ast
import os
import re
import sys

_SETUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "setup.py")


def _setup_keywords(path):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
      return {k.arg: k.value for k in node.keywords}
  raise ValueError(f"{path}: no setup(...) call")


def floors(path=_SETUP):
  """``[(name, version), ...]`` from ``install_requires``."""
  out = []
  for requirement in ast.literal_eval(_setup_keywords(path)["install_requires"]):
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", requirement)
    if match is None:
      raise ValueError(f"{path}: {requirement!r} is not 'name>=version'")
    out.append((match[1], match[2]))
  return out


def python_floor(path=_SETUP):
  spec = ast.literal_eval(_setup_keywords(path)["python_requires"])
  match = re.fullmatch(r"\s*>=\s*([0-9]+\.[0-9]+)\s*", spec)
  if match is None:
    raise ValueError(f"{path}: python_requires {spec!r} is not '>=X.Y'")
  return match[1]


def main(argv):
  if argv[1:] == ["--python"]:
    print(python_floor())
  elif len(argv) == 1:
    for name, version in floors():
      print(f"{name}=={version}")
  else:
    raise SystemExit(f"usage: {argv[0]} [--python]")


if __name__ == "__main__":
  main(sys.argv)
