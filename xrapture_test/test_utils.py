"""Helpers that several test files share (this file holds no tests).

A test file imports it as ``import test_utils``: pytest puts the test file's
directory on ``sys.path`` (no ``__init__.py`` here), Python does the same for a
file run as a script, and under Bazel the ``py_library`` ``test_utils`` in
xrapture_test/BUILD adds it. Neither pytest (pytest.ini, conftest.py) nor
Bazel (the ``*_test.py`` glob) collects it as a test.

What a test checks against stays in the test file: here are only helpers
that were written out again, the same, in several files.
"""

import importlib
import os
import sys
import tempfile
import warnings

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import xrapture

# The repository root: the source tree, or Bazel's runfiles (//:repo_data lays
# out there what the tests read, as in the source tree).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def append_repo_root(*subdirs: str) -> str:
  """Appends the repository root (then its ``subdirs``) to ``sys.path``.

  For the test files that import experiments/, configs/, benchmarks/ or
  tools/, which are not part of the package. Appended, never inserted: the
  installed xrapture stays the one imported (test.sh tests its wheel so), and
  this checkout's is imported only where none is installed.

  Args:
    *subdirs: directories under the root to append after it (e.g. ``tools``).

  Returns:
    The repository root.
  """
  for path in (REPO_ROOT, *(os.path.join(REPO_ROOT, d) for d in subdirs)):
    if path not in sys.path:
      sys.path.append(path)
  return REPO_ROOT


def import_launcher(module: str):
  """The launcher ``module`` (e.g. ``experiments.finetune``), imported afresh.

  Each launcher defines ``--config`` and ``--workdir``; under pytest another
  test file's launcher may have defined them already in this process.
  """
  for name in ('config', 'workdir'):
    if name in flags.FLAGS:
      delattr(flags.FLAGS, name)
  sys.modules.pop(module, None)
  return importlib.import_module(module)


def tmpdir(test) -> str:
  """A new directory, removed when ``test`` (a TestCase) is cleaned up.

  Not absltest's ``create_tempdir``: it needs absl's flags parsed, which
  pytest does not do.
  """
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return tmp.name


def rand(seed: int, *shape: int, scale: float = 1.0) -> jax.Array:
  """A float32 array of ``shape``, normal with standard deviation ``scale``."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def materialization_messages(fn, *args):
  """``fn(*args)`` and the texts of the MaterializationWarnings it raised."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = fn(*args)
  return out, [
    str(w.message) for w in caught if issubclass(w.category, xrapture.MaterializationWarning)
  ]


def flat_with_names(params):
  """``(names, leaves, treedef)`` of ``params``, a LoraWeight being one leaf.

  A name is the leaf's path joined by ``/`` (``linear/w``).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=xrapture.is_implicit)
  names = ['/'.join(str(getattr(k, 'key', k)) for k in p) for p, _ in flat]
  return names, [v for _, v in flat], treedef


def randomize_adapters(params, seed: int = 0, stddev: float = 0.3):
  """``params`` with random ``a`` and ``b`` in every LoraWeight (a trained adapter)."""
  rng = np.random.default_rng(seed)

  def randomize(x):
    if not isinstance(x, xrapture.LoraWeight):
      return x
    return x.replace(
      a=jnp.asarray(rng.normal(0, stddev, x.a.shape), x.a.dtype),
      b=jnp.asarray(rng.normal(0, stddev, x.b.shape), x.b.dtype),
    )

  return xrapture.tree_map_with_implicit(randomize, params)
