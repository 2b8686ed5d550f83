r"""Adapts the pretrained base to domain B: LoRA vs full fine-tune vs head-only.

The README's main command:

  python experiments/finetune.py --config=configs/finetune.py --workdir=./workdir

pretrains the base on domain A (the stdlib's Python modules) unless
``<workdir>/base`` already holds it, fine-tunes it on domain B (the Python
reference text that ``help()`` shows) with each method, and writes the
comparison table (``results.md``), the curves (``curves.png``), one
``metrics.jsonl`` and one adapter file per method. Rerunning with the same
workdir resumes where it stopped.

One method only: ``--config=configs/finetune.py:lora`` (or ``:qlora``,
``:full``, ``:head``). Fields are overridden as ``--config.lora.rank=16``,
``--config.num_steps=500``, ``--config.mesh='(4, 2)'``. Adding ``smoke``
(``:smoke``, ``:lora,smoke``) shrinks the model and the step counts so the
whole pipeline runs in seconds (the smoke tests use it).
"""

import ml_collections
import xrapture

from configs import common

METHODS = ('lora', 'qlora', 'full', 'head')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the fine-tuning config.

  Args:
    arg: comma-separated: a method (``'lora'``, ``'qlora'``, ``'full'`` or
      ``'head'``) to run that method alone, else all run for the comparison;
      and/or
      ``'smoke'`` for a tiny model and a few steps.
  """
  words = [w for w in (arg or '').split(',') if w]
  unknown = [w for w in words if w not in METHODS + ('smoke',)]
  methods = [w for w in words if w in METHODS]
  if unknown or len(methods) > 1:
    raise ValueError(
        f'Bad config argument {arg!r}: use configs/finetune.py[:<method>][,smoke] '
        f'with <method> one of {METHODS}.')
  method = methods[0] if methods else None
  config = ml_collections.ConfigDict()

  # Seeds adapter initialization and the order of training batches.
  config.seed = 0
  # Domain B, the corpus fine-tuned on: 'docs' (the reference text of
  # pydoc_data.topics) or 'code'. See experiments/lm_data.py.
  config.domain = 'docs'
  # Methods run, in this order; the table also has the base model's row.
  config.methods = METHODS if not method else (method,)

  # The base: its architecture (config.pretrain.model), and how it is
  # pretrained on domain A when there is no base checkpoint yet (the fields
  # of configs/pretrain.py but the launch ones, which are below).
  config.pretrain = common.pretraining()
  # A workdir of experiments/pretrain.py to take the base from; '' uses
  # <workdir>/base, pretraining it there first if it is missing.
  config.base_checkpoint = ''

  # The LoRA method's config: xrapture.default_config(), whose docstring describes
  # every field; the ones changed here:
  config.lora = xrapture.default_config()
  # The best setting of the sweep (configs/sweep.py, README "The sweep")
  # within 25% of full fine-tuning's trainable parameters.
  # Adapter rank r (d_model is 128).
  config.lora.rank = 20
  # The update b @ a is scaled by alpha / sqrt(r) (rsLoRA).
  config.lora.alpha = 32.0
  config.lora.rslora = True
  # Kernels that get adapters, re.fullmatch-ed against paths such as
  # 'blocks/__layer_stack_no_per_layer/block/attn/query/w': every attention
  # and MLP kernel, the token embedding and the unembedding.
  config.lora.targets = (r'.*/attn/(query|key|value|linear)/w', r'.*/mlp/~/linear_\d/w',
                         r'embed/embeddings', r'head/w')
  # Parameters trained in full alongside the adapters: none (the unembedding
  # has an adapter; the sweep found that better than training it in full).
  config.lora.full = ()
  # LayerNorm scales and offsets and every bias trained in full too.
  config.lora.tune_vectors = True
  # The QLoRA method: the LoRA method's config on a base stored in 4 bits
  # (NF4, bitsandbytes' format: every adapted kernel) with double
  # quantization of the absmaxes.
  config.qlora = ml_collections.ConfigDict(dict(
      quantize='nf4', quantize_block=64, double_quant=True))
  # Parameters the head-only method trains (all others stay frozen).
  config.head = (r'head/.*',)

  # Peak learning rate per method (AdamW, linear warmup, cosine decay to a
  # tenth); each the best of {3e-3, 1e-2, 3e-2} (full: also 1e-3) on the val
  # split with the other defaults.
  config.learning_rate = ml_collections.ConfigDict()
  # For the adapters (and config.full parameters) of the LoRA method.
  config.learning_rate.lora = 1e-2
  # For the adapters of the QLoRA method.
  config.learning_rate.qlora = 1e-2
  # For every parameter, in the full fine-tune.
  config.learning_rate.full = 1e-2
  # For the head, in the head-only method.
  config.learning_rate.head = 1e-2
  # LoRA+ (PEFT's loraplus_lr_ratio) for the LoRA method: the adapters' `a`
  # factors (PEFT's lora_B), DoRA magnitudes and 1-D parameters learn this many
  # times faster; None: off.
  config.loraplus_lr_ratio = ml_collections.config_dict.placeholder(float)
  # num_steps, batch_size, seq_len, warmup, weight decay, clipping, eval,
  # checkpoint and log cadence (configs/common.py), per method.
  common.add_schedule_fields(config, num_steps=300, warmup_steps=20,
                             weight_decay=0.0, eval_every=50,
                             final_eval_batches=0, checkpoint_every=100)
  # job ('finetune'), mesh, distributed, cluster.
  common.add_launch_fields(config, 'finetune')

  if 'smoke' in words:
    common.shrink(config.pretrain)
    common.shrink_schedule(config)
    config.lora.rank = 4
    config.qlora.quantize_block = 32   # the smoke model's 32-wide input axes
  return config
