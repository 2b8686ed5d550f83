"""Quantized frozen arrays (NF4, int8) and the handlers that run JAX primitives on them.

Knows nothing of LoRA or Haiku.
"""

# Importing the handler modules registers them.
from xrapture._src.quant import dot_general as _dot_general
from xrapture._src.quant import gather as _gather
from xrapture._src.quant import structural as _structural
