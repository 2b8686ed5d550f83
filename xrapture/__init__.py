"""xrapture: LoRA for JAX + Haiku as a functional transform."""

__version__ = "0.1.0"
