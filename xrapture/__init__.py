"""xrapture: LoRA for JAX + Haiku as a functional transform."""

from xrapture._src import implicit as _implicit  # registers higher-order rules
from xrapture._src import lora as _lora  # registers LoraWeight handlers
from xrapture._src import quant as _quant  # registers QuantizedArray handlers
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
from xrapture._src.io.adapter import load_adapter
from xrapture._src.io.adapter import save_adapter
from xrapture._src.io.peft import export_peft
from xrapture._src.io.peft import import_peft
from xrapture._src.lora.dot_general import lora_matmul
from xrapture._src.lora.lora_weight import LORA_FREEZE
from xrapture._src.lora.lora_weight import LORA_FULL
from xrapture._src.lora.lora_weight import LoraWeight
from xrapture._src.optim.freeze import freeze_keys
from xrapture._src.optim.freeze import freeze_subtrees
from xrapture._src.optim.wrap import wrap_optimizer
from xrapture._src.quant.quantize import quantize_array
from xrapture._src.quant.quantized_array import dequantize
from xrapture._src.quant.quantized_array import QuantizedArray
from xrapture._src.transform.adapters import count_trainable
from xrapture._src.transform.adapters import merge_params
from xrapture._src.transform.adapters import split_lora_params
from xrapture._src.transform.facade import XRapTure
from xrapture._src.transform.facade import XRapTureConfig
from xrapture._src.transform.facade import XRapTureModule
from xrapture._src.transform.quantization import merge_and_requantize
from xrapture._src.transform.quantization import quantize
from xrapture._src.transform.spec import default_spec
from xrapture._src.transform.transform import LoraTransformed
from xrapture._src.transform.transform import transform
from xrapture._src.transform.transform import transform_with_state

__version__ = "0.1.0"

__all__ = (
    "ArrayValue",
    "aux_field",
    "count_trainable",
    "CustomRuleDroppedWarning",
    "default_handler",
    "default_spec",
    "dequantize",
    "EmptyNode",
    "export_peft",
    "freeze_keys",
    "freeze_subtrees",
    "ImplicitArray",
    "import_peft",
    "is_implicit",
    "load_adapter",
    "LORA_FREEZE",
    "LORA_FULL",
    "lora_matmul",
    "LoraTransformed",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "materialize_nested",
    "merge_and_requantize",
    "merge_params",
    "primitive_handler",
    "quantize",
    "quantize_array",
    "QuantizedArray",
    "save_adapter",
    "split_lora_params",
    "strict_mode",
    "transform",
    "transform_with_state",
    "tree_map_with_implicit",
    "use_implicit_args",
    "wrap_optimizer",
    "XRapTure",
    "XRapTureConfig",
    "XRapTureModule",
)

#  _________________________________________
# / Please don't use symbols in `_src` they \
# \ are not part of the xrapture public API. /
#  -----------------------------------------
try:
  del _src  # pylint: disable=undefined-variable
except NameError:
  pass
