r"""Pretrains the base model: a byte-level Transformer LM on domain A.

Domain A is the Python standard library's own modules (``code``, see
experiments/lm_data.py); configs/finetune.py then adapts the base to domain B.

  python experiments/pretrain.py --config=configs/pretrain.py --workdir=/tmp/base

Fields can be overridden on the command line, e.g.
``--config.num_steps=2000 --config.model.num_layers=4``.
``--config=configs/pretrain.py:smoke`` trains a tiny model for a few steps:
a check of the pipeline in seconds (the smoke tests use it).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the pretraining config.

  Args:
    arg: None, or ``'smoke'`` for a tiny model and a few steps.
  """
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'Unknown config argument {arg!r}: use configs/pretrain.py '
                     'or configs/pretrain.py:smoke.')
  config = ml_collections.ConfigDict()

  # Seeds the parameter initialization and the order of training batches.
  config.seed = 0
  # Corpus the model is trained on: 'code' (stdlib modules) or 'docs' (the
  # reference text of pydoc_data.topics). See experiments/lm_data.py.
  config.domain = 'code'

  # The architecture (experiments/lm_model.py). A checkpoint only loads into
  # a model with the same five numbers.
  config.model = ml_collections.ConfigDict()
  # Width of the residual stream.
  config.model.d_model = 128
  # Decoder blocks, stacked with hk.layer_stack.
  config.model.num_layers = 2
  # Attention heads; each has d_model // num_heads dimensions.
  config.model.num_heads = 4
  # Hidden width of each block's MLP.
  config.model.mlp_dim = 512
  # Longest sequence the model accepts (size of the learned position table).
  config.model.max_len = 128

  # Training steps; the learning rate decays over exactly this many.
  config.num_steps = 800
  # Sequences per step (must divide evenly over the mesh's 'data' axis).
  config.batch_size = 32
  # Bytes per training sequence (at most model.max_len).
  config.seq_len = 128
  # Peak AdamW learning rate, reached after warmup_steps of linear warmup,
  # then cosine-decayed to a tenth of it.
  config.learning_rate = 3e-3
  # Linear warmup steps.
  config.warmup_steps = 50
  # AdamW decoupled weight decay.
  config.weight_decay = 0.01
  # Gradients are clipped to this global norm.
  config.grad_clip_norm = 1.0

  # Validate every this many steps ...
  config.eval_every = 100
  # ... on this many batches of the val split.
  config.eval_batches = 4
  # Batches per split in the final evaluation, spread evenly over it (0: every
  # window; the code domain's splits are large).
  config.final_eval_batches = 16
  # Write a checkpoint (atomically) every this many steps, and at the end.
  config.checkpoint_every = 200
  # Newest checkpoints kept; older ones are deleted.
  config.keep_checkpoints = 2
  # Log the training loss (metrics.jsonl, progress bar) every this many steps.
  config.log_every = 10
  # Show a tqdm progress bar with the loss and tokens/s.
  config.progress_bar = True

  # Device mesh (data, model): batches split over 'data', kernels' last axis
  # over 'model'; -1 takes all remaining devices. (-1, 1): data parallel.
  config.mesh = (-1, 1)
  # Call jax.distributed.initialize() first (multi-host; see the launcher).
  config.distributed = False

  if arg == 'smoke':
    shrink(config)
  return config


def shrink(config: ml_collections.ConfigDict) -> None:
  """Makes ``config`` train a tiny model for a few steps (``:smoke``)."""
  config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=32)
  config.update(num_steps=6, batch_size=8, seq_len=32, warmup_steps=2,
                eval_every=3, eval_batches=1, final_eval_batches=2,
                checkpoint_every=3, log_every=1)
