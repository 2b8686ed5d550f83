"""Experiments built on xrapture: a byte-level LM pretrained, then adapted.

Entry points: experiments/pretrain.py, experiments/finetune.py and
experiments/sweep.py (run them as scripts; see configs/). Read from the top:

* ``launch``: flags, config checks, ``jax.distributed`` (``distributed``),
  the mesh (``sharding``), then the job the config names:
* ``pretraining`` / ``finetuning``: what each job trains, in which order;
  ``variants``: the fine-tuning methods (LoRA, full, head-only);
  ``sweeping``: many LoRA settings, each against full fine-tuning;
* ``lm_model``: the base model: built, initialized, saved, loaded;
  ``lm_data``: the corpora and batches;
* ``trainer``: the loop (steps, validation, resume), with ``checkpointing``
  (orbax), ``metrics`` (metrics.jsonl) and ``atomic`` (whole-file writes);
* ``report``: the table and the curves; ``sweep_report``: the sweep's.
"""
