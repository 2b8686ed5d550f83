"""Quantized frozen arrays (NF4, int8) and the handlers that run JAX primitives on them.

Knows nothing of LoRA or Haiku.
"""
