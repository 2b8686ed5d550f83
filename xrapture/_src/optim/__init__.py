"""Optax wrappers: freezing leaves and LoRA's base kernels."""
