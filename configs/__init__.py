"""ml_collections configs of the experiments launchers (see experiments/launch.py).

``configs/pretrain.py``, ``configs/finetune.py`` and ``configs/sweep.py``
(``finetune.py``'s fields and the sweep's stages) are passed by path
(``--config=configs/finetune.py:lora``); ``common.py`` holds what they share.
"""
