"""Adapter files: xrapture's own format and HuggingFace PEFT's."""
