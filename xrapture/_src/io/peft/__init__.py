"""HuggingFace PEFT LoRA adapters: export to and import from PEFT's format.

A PEFT adapter directory holds ``adapter_model.safetensors`` and
``adapter_config.json``. Its tensors are keyed by torch module path, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so the
caller says which torch module each Haiku parameter is, with a ``name_map``.

The modules, each importing only modules listed above it:

  naming.py          the ``name_map``: Haiku parameter path -> torch module
  convert.py         LoRA factors and whole weights, Haiku layout <-> torch's
  keys.py            the safetensors keys of each module's tensors; parsing them
  patterns.py        PEFT's ``target_modules`` / ``rank_pattern`` matching rules
  adapter_config.py  the config fields xrapture knows, and those it refuses
  files.py           the directory's two files: writing and reading them
  export.py          :func:`export_peft`
  import_.py         :func:`import_peft`
"""

from xrapture._src.io.peft.export import export_peft
from xrapture._src.io.peft.files import CONFIG_NAME
from xrapture._src.io.peft.files import WEIGHTS_NAME
from xrapture._src.io.peft.import_ import import_peft
from xrapture._src.io.peft.naming import NameMap
from xrapture._src.io.peft.naming import TorchPath

# Internals xrapture_test/peft_test.py checks directly.
from xrapture._src.io.peft.adapter_config import _is_off
from xrapture._src.io.peft.adapter_config import _KNOWN_FIELDS
from xrapture._src.io.peft.adapter_config import _UNSUPPORTED
from xrapture._src.io.peft.patterns import _pattern_value
from xrapture._src.io.peft.patterns import _patterns
