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

Renamed methods and keyword arguments are one line each too::

  class LoraTransformed:
    def new_name(self, ...): ...
    old_name = deprecations.method_alias(new_name, "LoraTransformed.old_name")

  @deprecations.renamed_kwargs(old="new")
  def function(new): ...
"""

from collections.abc import Callable
from collections.abc import Mapping
import functools
from typing import Any, TypeVar
import warnings

_F = TypeVar("_F", bound=Callable[..., Any])

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


def method_alias(method: _F, old: str) -> _F:
  """A deprecated method name ``old`` (e.g. ``"Model.spec"``) for ``method``.

  Args:
    method: the method under its new name, as defined in the class body.
    old: ``"Class.old_name"``, for the message.

  Returns:
    A function that warns (``DeprecationWarning`` naming the new method) and
    calls ``method``.
  """
  owner = old.rsplit(".", 1)[0]

  @functools.wraps(method)
  def alias(*args: Any, **kwargs: Any) -> Any:
    warnings.warn(
      f"{old} is deprecated and will be removed in a future release; "
      f"instead, use {owner}.{method.__name__}.",
      DeprecationWarning,
      stacklevel=2,
    )
    return method(*args, **kwargs)

  return alias  # type: ignore[return-value]


def renamed_kwargs(**renames: str) -> Callable[[_F], _F]:
  """Decorator: keyword arguments ``old=new`` still accepted under ``old``.

  Args:
    **renames: old keyword name -> new keyword name.

  Returns:
    A decorator whose function takes each old keyword with a
    ``DeprecationWarning`` and passes it on under the new one; both at once
    is a ``TypeError``.
  """

  def decorate(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
      for old, new in renames.items():
        if old not in kwargs:
          continue
        if new in kwargs:
          raise TypeError(
            f"{fn.__qualname__}() got both {old}= (deprecated) and {new}=; pass {new}= only."
          )
        warnings.warn(
          f"{fn.__qualname__}({old}=...) is deprecated and will be removed in a "
          f"future release; instead, use {new}=.",
          DeprecationWarning,
          stacklevel=2,
        )
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

  return decorate
