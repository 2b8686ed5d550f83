"""Which code runs when a JAX primitive meets an implicit array.

A plain dict maps a primitive name to its handlers. Handlers are tried newest
first; a handler returns ``NotImplemented`` to pass to the next one. When none
applies, the implicit inputs are materialized with a warning, or an error in
strict mode.
"""

import contextlib
import contextvars
import warnings
from typing import Any, Callable, Iterator, Sequence

from xrapture._src.implicit import implicit_array

Handler = Callable[..., Any]

_HANDLERS: dict[str, list[Handler]] = {}
_HIGHER_ORDER: dict[str, Handler] = {}
_STRICT = contextvars.ContextVar("xrapture_strict", default=False)


class MaterializationWarning(UserWarning):
  """An implicit array was turned into a dense array."""


class CustomRuleDroppedWarning(UserWarning):
  """A custom_jvp/custom_vjp rule was inlined because an implicit value entered."""


class MaterializationError(RuntimeError):
  """Strict mode forbade turning an implicit array into a dense array."""


def primitive_handler(names: str | Sequence[str]) -> Callable[[Handler], Handler]:
  """Registers ``handler(primitive, *args, **params)`` for primitive names.

  Args:
    names: a primitive name such as ``"dot_general"``, or several.

  Returns:
    A decorator that registers the function and returns it unchanged. The
    function gets the primitive, its operands (any of which may be implicit)
    and the equation's parameters, and returns the result, or
    ``NotImplemented`` to let an older handler (or materialization) act.
  """
  names = (names,) if isinstance(names, str) else tuple(names)

  def register(handler: Handler) -> Handler:
    for name in names:
      _HANDLERS.setdefault(name, []).append(handler)
    return handler
  return register


def handlers_for(name: str) -> list[Handler]:
  """Handlers for ``name``, newest first."""
  return list(reversed(_HANDLERS.get(name, ())))


def higher_order_rule(names: Sequence[str]) -> Callable[[Handler], Handler]:
  """Registers the interpreter's rule for a primitive that holds jaxprs."""
  def register(rule: Handler) -> Handler:
    for name in names:
      _HIGHER_ORDER[name] = rule
    return rule
  return register


def higher_order_rule_for(name: str) -> Handler | None:
  return _HIGHER_ORDER.get(name)


@contextlib.contextmanager
def strict_mode(enabled: bool = True) -> Iterator[None]:
  """Within this context, any materialization raises MaterializationError.

  Use it to prove that a model runs without ever forming a dense weight:
  ``with xrapture.strict_mode(): model.apply(params, rng, batch)``.
  Materialization happens while tracing, so under ``jax.jit`` the error is
  raised the first time the function is traced inside the context.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from xrapture import implicit
    >>> class Doubled(implicit.ImplicitArray):  # stands for 2 * value
    ...   value: jax.Array
    ...   shape = property(lambda self: self.value.shape)
    ...   dtype = property(lambda self: self.value.dtype)
    ...   def materialize(self):
    ...     return 2 * self.value
    >>> sin = implicit.use_implicit_args(jnp.sin)  # no handler for sin
    >>> try:
    ...   with implicit.strict_mode():
    ...     sin(Doubled(jnp.zeros(3)))
    ... except implicit.MaterializationError as e:
    ...   print(e)
    Doubled of shape (3,) materialized: no handler for primitive 'sin'...
  """
  token = _STRICT.set(enabled)
  try:
    yield
  finally:
    _STRICT.reset(token)


def is_strict() -> bool:
  return _STRICT.get()


def materialize(value: Any, reason: str) -> Any:
  """Materializes ``value`` if implicit, warning (or raising in strict mode)."""
  if not implicit_array.is_implicit(value):
    return value
  message = (
      f"{type(value).__name__} of shape {tuple(value.shape)} materialized: "
      f"{reason}. This forms the dense array; register a handler with "
      "xrapture.primitive_handler to avoid it.")
  if is_strict():
    raise MaterializationError(message + " (strict mode is on)")
  warnings.warn(message, MaterializationWarning, stacklevel=2)
  return implicit_array.materialize_nested(value)


def default_handler(primitive: Any, *args: Any, **params: Any) -> Any:
  """Materializes implicit operands (with a warning) and binds ``primitive``."""
  reason = f"no handler for primitive '{primitive.name}'"
  dense = [materialize(a, reason) for a in args]
  return primitive.bind(*dense, **params)
