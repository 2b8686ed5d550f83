"""xrapture: LoRA for JAX + Haiku as a functional transform."""

from xrapture._src import implicit as _implicit  # registers higher-order rules
from xrapture._src import lora as _lora  # registers LoraWeight handlers
from xrapture._src.implicit.implicit_array import ArrayValue
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
from xrapture._src.lora.dot_general import lora_matmul
from xrapture._src.lora.lora_weight import LORA_FREEZE
from xrapture._src.lora.lora_weight import LORA_FULL
from xrapture._src.lora.lora_weight import LoraWeight
from xrapture._src.optim.freeze import freeze_keys
from xrapture._src.optim.freeze import freeze_subtrees

__version__ = "0.1.0"

__all__ = (
    "ArrayValue",
    "aux_field",
    "CustomRuleDroppedWarning",
    "default_handler",
    "EmptyNode",
    "freeze_keys",
    "freeze_subtrees",
    "ImplicitArray",
    "is_implicit",
    "LORA_FREEZE",
    "LORA_FULL",
    "lora_matmul",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "materialize_nested",
    "primitive_handler",
    "strict_mode",
    "tree_map_with_implicit",
    "use_implicit_args",
)

#  _________________________________________
# / Please don't use symbols in `_src` they \
# \ are not part of the xrapture public API. /
#  -----------------------------------------
try:
  del _src  # pylint: disable=undefined-variable
except NameError:
  pass
