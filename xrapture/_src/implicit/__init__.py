"""Implicit arrays and the primitive dispatch that runs them. Knows nothing of LoRA."""

from xrapture._src.implicit import higher_order as _higher_order  # registers rules
