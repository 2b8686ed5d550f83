"""Sphinx configuration: API docs from docstrings (autodoc, Google style).

Build: sphinx-build -W --keep-going -b html docs docs/_build/html
(tools/check.sh does this with warnings as errors). The ``>>>`` examples in
the docstrings run in xrapture_test/doctest_test.py.
"""

import inspect
import os
import sys

# Document the working tree's xrapture, installed or not.
sys.path.insert(0, os.path.abspath(".."))

import xrapture  # noqa: E402  (needs the path above)
import xrapture.implicit  # noqa: E402
import xrapture.testing  # noqa: E402
from sphinx.util import logging  # noqa: E402

project = "xrapture"
author = "The xrapture authors"
copyright = "the xrapture authors"
release = version = xrapture.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Class "Attributes:" sections as field lists, so they don't duplicate the
# attributes autodoc documents.
napoleon_use_ivar = True
# default_config documents its ConfigDict's fields in a "Fields:" section.
napoleon_custom_sections = [("Fields", "params_style")]

_LOGGER = logging.getLogger(__name__)

# Public modules and the names each must document.
_PUBLIC = (xrapture, xrapture.implicit, xrapture.testing)


def _check_public_names(app, env):
  """Warns (an error under -W) for a public name without docs."""
  del app
  documented = set(env.get_domain("py").objects)
  for module in _PUBLIC:
    for name in module.__all__:
      value = getattr(module, name)
      full = f"{module.__name__}.{name}"
      candidates = {full}
      if module is xrapture and name in xrapture.implicit.__all__:
        candidates.add(f"xrapture.implicit.{name}")  # documented there, once
      if not candidates & documented:
        _LOGGER.warning(f"public name {full} is not in the docs (docs/*.rst)")
      if (inspect.isfunction(value) or inspect.isclass(value)) and not inspect.getdoc(value):
        _LOGGER.warning(f"public name {full} has no docstring")


def setup(app):
  app.connect("env-check-consistency", _check_public_names)
