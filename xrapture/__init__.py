"""xrapture: LoRA for JAX + Haiku as a functional transform."""

import jax as _jax

from xrapture import implicit
from xrapture._src import deprecations as _deprecations
from xrapture._src import implicit as _implicit  # registers higher-order rules
from xrapture._src import lora as _lora  # registers LoraWeight handlers
from xrapture._src import quant as _quant  # registers QuantizedArray handlers
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
from xrapture._src.lora import dot_general as _dot_general
from xrapture._src.lora.dora import DoraWeight
from xrapture._src.lora.lora_weight import LORA_FREEZE
from xrapture._src.lora.lora_weight import LORA_FULL
from xrapture._src.lora.lora_weight import LoraWeight
from xrapture._src.lora.mixed_lora import MixedLoraWeight
from xrapture._src.optim.freeze import freeze_keys
from xrapture._src.optim.freeze import freeze_subtrees
from xrapture._src.optim.wrap import wrap_optimizer
from xrapture._src.quant.quantize import quantize_array
from xrapture._src.quant.quantized_array import dequantize
from xrapture._src.quant.quantized_array import QuantizedArray
from xrapture._src.transform.adapters import count_trainable
from xrapture._src.transform.config import default_config
from xrapture._src.transform.adapters import merge_params
from xrapture._src.transform.adapters import split_lora_params
from xrapture._src.transform.facade import XRapTure
from xrapture._src.transform.facade import XRapTureConfig
from xrapture._src.transform.facade import XRapTureModule
from xrapture._src.transform.mixed_batch import mixed_adapter_params
from xrapture._src.transform.mixed_batch import with_adapter_ids
from xrapture._src.transform.multi_adapter import adapter_params
from xrapture._src.transform.multi_adapter import add_adapter
from xrapture._src.transform.multi_adapter import add_weighted_adapter
from xrapture._src.transform.multi_adapter import AdapterSet
from xrapture._src.transform.multi_adapter import delete_adapter
from xrapture._src.transform.multi_adapter import disable_adapters
from xrapture._src.transform.multi_adapter import merge_adapter
from xrapture._src.transform.multi_adapter import set_adapter
from xrapture._src.transform.multi_adapter import unmerge_adapter
from xrapture._src.transform.quantization import merge_and_requantize
from xrapture._src.transform.quantization import quantize
from xrapture._src.transform.transform import LoraTransformed
from xrapture._src.transform.transform import transform
from xrapture._src.transform.transform import transform_with_state
from xrapture._src.version import __version__

__all__ = (
    "adapter_params",
    "AdapterSet",
    "add_adapter",
    "add_weighted_adapter",
    "aux_field",
    "count_trainable",
    "CustomRuleDroppedWarning",
    "default_config",
    "default_handler",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "DoraWeight",
    "EmptyNode",
    "export_peft",
    "freeze_keys",
    "freeze_subtrees",
    "ImplicitArray",
    "implicit",
    "import_peft",
    "is_implicit",
    "load_adapter",
    "LORA_FREEZE",
    "LORA_FULL",
    "LoraTransformed",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "materialize_nested",
    "merge_adapter",
    "merge_and_requantize",
    "merge_params",
    "mixed_adapter_params",
    "MixedLoraWeight",
    "primitive_handler",
    "quantize",
    "quantize_array",
    "QuantizedArray",
    "save_adapter",
    "set_adapter",
    "split_lora_params",
    "strict_mode",
    "transform",
    "transform_with_state",
    "tree_map_with_implicit",
    "unmerge_adapter",
    "use_implicit_args",
    "with_adapter_ids",
    "wrap_optimizer",
    "XRapTure",
    "XRapTureConfig",
    "XRapTureModule",
)

# Deprecated names: they work and warn. One line each:
#   "old_name": ("what to use instead", the_object),
_DEPRECATED = {
    "ArrayValue": ("jax.Array", _jax.Array),
    "default_spec": ("xrapture.default_config", default_config),
    "lora_matmul": ("a LoraWeight under xrapture.transform or "
                    "xrapture.implicit.use_implicit_args (its dot_general "
                    "handler runs this kernel)", _dot_general.lora_matmul),
}
__getattr__ = _deprecations.module_getattr(__name__, _DEPRECATED)

#  _________________________________________
# / Please don't use symbols in `_src` they \
# \ are not part of the xrapture public API. /
#  -----------------------------------------
try:
  del _src  # type: ignore[name-defined]  # pylint: disable=undefined-variable
except NameError:
  pass
