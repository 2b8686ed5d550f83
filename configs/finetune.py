r"""Adapts the pretrained base to domain B: LoRA vs full fine-tune vs head-only.

The README's main command:

  python experiments/finetune.py --config=configs/finetune.py --workdir=./workdir

pretrains the base on domain A (the stdlib's Python modules) unless
``<workdir>/base`` already holds it, fine-tunes it on domain B (the Python
reference text that ``help()`` shows) with each method, and writes the
comparison table (``results.md``), the curves (``curves.png``), one
``metrics.jsonl`` and one adapter file per method. Rerunning with the same
workdir resumes where it stopped.

One method only: ``--config=configs/finetune.py:lora`` (or ``:full``,
``:head``). Fields are overridden as ``--config.lora.rank=16``,
``--config.num_steps=500``, ``--config.mesh='(4, 2)'``. Adding ``smoke``
(``:smoke``, ``:lora,smoke``) shrinks the model and the step counts so the
whole pipeline runs in seconds (the smoke tests use it).
"""

import importlib.util
import os

import ml_collections
import xrapture

METHODS = ('lora', 'full', 'head')


def _pretrain_configs():
  """configs/pretrain.py, which lies next to this file, as a module."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain.py')
  spec = importlib.util.spec_from_file_location('_xrapture_pretrain_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the fine-tuning config.

  Args:
    arg: comma-separated: a method (``'lora'``, ``'full'`` or ``'head'``) to
      run that method alone, else all three run for the comparison; and/or
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
  pretrain_configs = _pretrain_configs()
  config = ml_collections.ConfigDict()

  # Seeds adapter initialization and the order of training batches.
  config.seed = 0
  # Domain B, the corpus fine-tuned on: 'docs' (the reference text of
  # pydoc_data.topics) or 'code'. See experiments/lm_data.py.
  config.domain = 'docs'
  # Methods run, in this order; the table also has the base model's row.
  config.methods = METHODS if not method else (method,)

  # The base: its architecture (config.pretrain.model), and how it is
  # pretrained on domain A when there is no base checkpoint yet (see
  # configs/pretrain.py for every field; mesh and distributed are the ones
  # below).
  config.pretrain = pretrain_configs.get_config()
  del config.pretrain['mesh']
  del config.pretrain['distributed']
  # A workdir of experiments/pretrain.py to take the base from; '' uses
  # <workdir>/base, pretraining it there first if it is missing.
  config.base_checkpoint = ''

  # The LoRA method's spec: xrapture.default_spec(), whose docstring describes
  # every field; the ones changed here:
  config.lora = xrapture.default_spec()
  # Adapter rank r (d_model is 128).
  config.lora.rank = 16
  # The update b @ a is scaled by alpha / r.
  config.lora.alpha = 32.0
  # Kernels that get adapters, re.fullmatch-ed against paths such as
  # 'blocks/__layer_stack_no_per_layer/block/attn/query/w': every attention
  # and MLP kernel.
  config.lora.targets = (r'.*/attn/(query|key|value|linear)/w', r'.*/mlp/~/linear_\d/w')
  # Parameters trained in full alongside the adapters: the unembedding (7% of
  # the model), which every method here trains.
  config.lora.full = (r'head/.*',)
  # Parameters the head-only method trains (all others stay frozen).
  config.head = (r'head/.*',)

  # Peak learning rate per method (AdamW, linear warmup, cosine decay to a
  # tenth); each the best of {3e-3, 1e-2, 3e-2} (full: also 1e-3) on the val
  # split with the other defaults.
  config.learning_rate = ml_collections.ConfigDict()
  # For the adapters (and spec.full parameters) of the LoRA method.
  config.learning_rate.lora = 1e-2
  # For every parameter, in the full fine-tune.
  config.learning_rate.full = 1e-2
  # For the head, in the head-only method.
  config.learning_rate.head = 1e-2
  # LoRA+ (PEFT's loraplus_lr_ratio) for the LoRA method: the adapters' `a`
  # factors (PEFT's lora_B), DoRA magnitudes and 1-D parameters learn this many
  # times faster; None: off.
  config.loraplus_lr_ratio = ml_collections.config_dict.placeholder(float)
  # Linear warmup steps.
  config.warmup_steps = 20
  # AdamW decoupled weight decay.
  config.weight_decay = 0.0
  # Gradients are clipped to this global norm.
  config.grad_clip_norm = 1.0

  # Training steps per method.
  config.num_steps = 300
  # Sequences per step (must divide evenly over the mesh's 'data' axis).
  config.batch_size = 32
  # Bytes per sequence (at most pretrain.model.max_len).
  config.seq_len = 128

  # Validate every this many steps ...
  config.eval_every = 50
  # ... on this many batches of the val split.
  config.eval_batches = 4
  # Batches per split in the final evaluation, spread evenly over it (0: every
  # non-overlapping window of the val and test splits).
  config.final_eval_batches = 0
  # Write a checkpoint (atomically) every this many steps, and at the end.
  config.checkpoint_every = 100
  # Newest checkpoints kept per method; older ones are deleted.
  config.keep_checkpoints = 2
  # Log the training loss (metrics.jsonl, progress bar) every this many steps.
  config.log_every = 10
  # Show a tqdm progress bar with the loss and tokens/s.
  config.progress_bar = True

  # Device mesh (data, model): batches split over 'data', kernels' (and
  # adapters') last axis over 'model'; -1 takes all remaining devices.
  config.mesh = (-1, 1)
  # Call jax.distributed.initialize() first (multi-host; see the launcher).
  config.distributed = False

  if 'smoke' in words:
    pretrain_configs.shrink(config.pretrain)
    config.update(num_steps=6, batch_size=8, seq_len=32, warmup_steps=2,
                  eval_every=3, eval_batches=1, final_eval_batches=2,
                  checkpoint_every=3, log_every=1)
    config.lora.rank = 4
  return config
