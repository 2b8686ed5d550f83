"""The implicit-array core, for array types of your own.

An :class:`ImplicitArray` stands for an array it never forms (``LoraWeight`` is
one). :func:`use_implicit_args` runs a function on such values by
interpreting its jaxpr: each primitive that meets an implicit operand goes to
the handlers registered with :func:`primitive_handler` for that primitive,
newest first, and falls back to :func:`default_handler`, which materializes
the operand with a :class:`MaterializationWarning` (an error inside
:func:`strict_mode`).

The same objects are also reachable as ``xrapture.<name>``, as in 0.1.0.
"""

from xrapture._src.implicit.implicit_array import aux_field
from xrapture._src.implicit.implicit_array import EmptyNode
from xrapture._src.implicit.implicit_array import ImplicitArray
from xrapture._src.implicit.implicit_array import is_implicit
from xrapture._src.implicit.implicit_array import materialize_nested
from xrapture._src.implicit.implicit_array import tree_map_with_implicit
from xrapture._src.implicit.interpreter import use_implicit_args
from xrapture._src.implicit.registry import CustomRuleDroppedWarning
from xrapture._src.implicit.registry import default_handler
from xrapture._src.implicit.registry import MaterializationError
from xrapture._src.implicit.registry import MaterializationWarning
from xrapture._src.implicit.registry import primitive_handler
from xrapture._src.implicit.registry import strict_mode

__all__ = (
  "aux_field",
  "CustomRuleDroppedWarning",
  "default_handler",
  "EmptyNode",
  "ImplicitArray",
  "is_implicit",
  "MaterializationError",
  "MaterializationWarning",
  "materialize_nested",
  "primitive_handler",
  "strict_mode",
  "tree_map_with_implicit",
  "use_implicit_args",
)
