"""What both configs share: the model, the pretraining run, the launch fields.

``configs/pretrain.py`` is :func:`pretraining` plus :func:`add_launch_fields`;
``configs/finetune.py`` nests :func:`pretraining` as ``config.pretrain`` (how
its base is made when it has none) and adds its own training fields.
"""

import ml_collections


def model() -> ml_collections.ConfigDict:
  """The architecture (experiments/lm_model.py); a base loads only into the same five numbers."""
  config = ml_collections.ConfigDict()
  # Width of the residual stream.
  config.d_model = 128
  # Decoder blocks, stacked with hk.layer_stack.
  config.num_layers = 2
  # Attention heads; each has d_model // num_heads dimensions.
  config.num_heads = 4
  # Hidden width of each block's MLP.
  config.mlp_dim = 512
  # Longest sequence the model accepts (size of the learned position table).
  config.max_len = 128
  return config


def add_schedule_fields(config: ml_collections.ConfigDict, *, num_steps: int,
                        warmup_steps: int, weight_decay: float, eval_every: int,
                        final_eval_batches: int, checkpoint_every: int) -> None:
  """The training loop's fields (experiments/trainer.py), with the defaults given."""
  # Training steps; the learning rate decays over exactly this many.
  config.num_steps = num_steps
  # Sequences per step (must divide evenly over the mesh's 'data' axis).
  config.batch_size = 32
  # Bytes per training sequence (at most the model's max_len).
  config.seq_len = 128
  # Linear warmup steps (AdamW; then cosine decay to a tenth of the peak).
  config.warmup_steps = warmup_steps
  # AdamW decoupled weight decay.
  config.weight_decay = weight_decay
  # Gradients are clipped to this global norm.
  config.grad_clip_norm = 1.0
  # Validate every this many steps ...
  config.eval_every = eval_every
  # ... on this many batches of the val split.
  config.eval_batches = 4
  # Batches per split in the final evaluation, spread evenly over it (0: every
  # non-overlapping window of the val and test splits).
  config.final_eval_batches = final_eval_batches
  # Write a checkpoint (orbax; atomic) every this many steps, and at the end.
  config.checkpoint_every = checkpoint_every
  # Newest checkpoints kept; older ones are deleted.
  config.keep_checkpoints = 2
  # Log the training loss (metrics.jsonl, progress bar) every this many steps.
  config.log_every = 10
  # Show a tqdm progress bar with the loss and tokens/s.
  config.progress_bar = True


def pretraining() -> ml_collections.ConfigDict:
  """How the base is pretrained on domain A (experiments/pretraining.py)."""
  config = ml_collections.ConfigDict()
  # Seeds the parameter initialization and the order of training batches.
  config.seed = 0
  # Corpus the model is trained on: 'code' (stdlib modules) or 'docs' (the
  # reference text of pydoc_data.topics). See experiments/lm_data.py.
  config.domain = 'code'
  # The architecture.
  config.model = model()
  # Peak AdamW learning rate.
  config.learning_rate = 3e-3
  add_schedule_fields(config, num_steps=800, warmup_steps=50, weight_decay=0.01,
                      eval_every=100, final_eval_batches=16, checkpoint_every=200)
  return config


def add_launch_fields(config: ml_collections.ConfigDict, job: str) -> None:
  """What experiments/launch.py reads before the job: job, mesh, multi-process."""
  # What the launcher runs: 'pretrain' or 'finetune'.
  config.job = job
  # Device mesh (data, model): batches split over 'data', kernels' (and
  # adapters') last axis over 'model'; -1 takes all remaining devices.
  config.mesh = (-1, 1)
  # Start jax.distributed first (several processes; README "Several processes").
  config.distributed = False
  # Where the processes meet; a field left at its default is taken from the
  # cluster environment (SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS).
  config.cluster = ml_collections.ConfigDict()
  # host:port of the coordinator, which process 0 runs.
  config.cluster.coordinator_address = ''
  # How many processes the run has (0: from the environment).
  config.cluster.num_processes = 0
  # This process's id, 0 .. num_processes - 1 (-1: from the environment).
  config.cluster.process_id = -1
  # Seconds to wait for every process to join; then each exits with an error.
  config.cluster.timeout_s = 300


def shrink(config: ml_collections.ConfigDict) -> None:
  """A tiny model and a few steps (``:smoke``), for pretraining configs."""
  config.model.update(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=32)
  shrink_schedule(config)


def shrink_schedule(config: ml_collections.ConfigDict) -> None:
  """A few steps with every event (log, eval, checkpoint) in them."""
  config.update(num_steps=6, batch_size=8, seq_len=32, warmup_steps=2,
                eval_every=3, eval_batches=1, final_eval_batches=2,
                checkpoint_every=3, log_every=1)
