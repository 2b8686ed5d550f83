"""Experiments built on xrapture: a byte-level LM pretrained, then adapted.

Launchers: experiments/pretrain.py and experiments/finetune.py (run them as
scripts; see configs/). The other modules are what they are built from.
"""
