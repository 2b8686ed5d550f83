"""Deprecated public names: they keep working, with a DeprecationWarning.

A public module lists its deprecated names in a dict and installs one module
``__getattr__`` (PEP 562), which Python calls only for names the module does
not define::

  _DEPRECATED = {
      # old name: (what to use instead, the object the old name gives)
      "ArrayValue": ("jax.Array", jax.Array),
  }
  __getattr__ = deprecations.module_getattr(__name__, _DEPRECATED)

Adding a deprecated alias is one line in that dict. Deprecated names stay out
of ``__all__``, so ``from xrapture import *`` and the docs skip them.
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
import warnings

# An entry: (what to use instead, as the warning names it; the object).
Alias = tuple[str, Any]


def message(module: str, name: str, instead: str) -> str:
  """The warning text for ``module.name``."""
  return (
    f"{module}.{name} is deprecated and will be removed in a future "
    f"release; instead, use {instead}."
  )


def module_getattr(module: str, aliases: Mapping[str, Alias]) -> Callable[[str], Any]:
  """A module ``__getattr__`` that serves ``aliases`` with a warning.

  Args:
    module: the module's ``__name__``, for the messages.
    aliases: deprecated name -> ``(what to use instead, object)``.

  Returns:
    A function that returns the object of a deprecated name after a
    ``DeprecationWarning`` that names the replacement, and raises
    ``AttributeError`` for any other name.
  """

  def getattr_(name: str) -> Any:
    if name in aliases:
      instead, value = aliases[name]
      warnings.warn(message(module, name, instead), DeprecationWarning, stacklevel=2)
      return value
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

  return getattr_
