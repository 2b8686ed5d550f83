"""ml_collections configs of the experiments launchers (see experiments/launch.py).

``configs/pretrain.py`` and ``configs/finetune.py`` are passed by path
(``--config=configs/finetune.py:lora``); ``common.py`` holds what both share.
"""
