"""LoraWeight and the handlers that run JAX primitives on it (no Haiku here)."""

# Importing the handler modules registers them.
from xrapture._src.lora import conv as _conv
from xrapture._src.lora import dora_ops as _dora_ops  # after the LoRA handlers
from xrapture._src.lora import dot_general as _dot_general
from xrapture._src.lora import gather as _gather
from xrapture._src.lora import mixed_lora as _mixed_lora
from xrapture._src.lora import ragged_dot as _ragged_dot
from xrapture._src.lora import structural as _structural
