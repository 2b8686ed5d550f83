r"""A sweep of LoRA settings on the main job (experiments/sweeping.py).

  python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/sweep

pretrains the base in ``<workdir>/base`` (or takes ``--config.base_checkpoint``),
fine-tunes it in full once (the reference), then runs the stages below in
order: each point is configs/finetune.py:lora with a few fields overridden,
trained in ``<workdir>/points/<name>``. Writes ``sweep.md``, ``sweep.json``
and ``sweep.png`` after every point; a rerun skips finished points and
resumes an interrupted one. ``--config=configs/sweep.py:smoke`` runs a tiny
model and two points in seconds.

A stage is ``(name, start, axes)``: ``start`` is ``'config'`` (the LoRA
settings below) or ``'best'`` (the best point of the stages before it that
fits the parameter budget); ``axes`` are ``(field, values)`` pairs, and the
stage runs their product. A field is a dotted path of the fine-tuning config
(``'lora.rank'``, ``'learning_rate.lora'``, ``'num_steps'``); a string value
of a tuple field names one of ``presets``.
"""

import ml_collections

from configs import finetune

# Attention projections of every block.
ATTN = (r'.*/attn/(query|key|value|linear)/w',)
# Every linear layer of the blocks, as PEFT's 'all-linear' (the output layer,
# here the unembedding 'head', is left out).
ALL_LINEAR = ATTN + (r'.*/mlp/~/linear_\d/w',)


def stage(name: str, start: str, *axes: tuple[str, tuple]) -> tuple:
  """One stage: ``(name, start, ((field, values), ...))``."""
  return (name, start, tuple((field, tuple(values)) for field, values in axes))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the sweep config.

  Args:
    arg: None, or ``'smoke'`` for a tiny model, a few steps and two points.
  """
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'Unknown config argument {arg!r}: use configs/sweep.py '
                     'or configs/sweep.py:smoke.')
  smoke = arg == 'smoke'
  # Every field of the LoRA fine-tune (configs/finetune.py): the settings a
  # point starts from, the base, the schedule, the mesh.
  config = finetune.get_config('lora,smoke' if smoke else 'lora')
  # What the launcher runs.
  config.job = 'sweep'
  # The LoRA settings the sweep starts from, pinned here (not taken from
  # configs/finetune.py, whose defaults the sweep's result changes) so that
  # point names and workdirs stay the same: those the main job had before the
  # sweep (76% of full fine-tuning's gain).
  config.lora.update(rank=4 if smoke else 16, alpha=32.0, targets=ALL_LINEAR,
                     full=(r'head/.*',), rslora=False, tune_vectors=False,
                     init_stddev=0.01)
  config.learning_rate.lora = 1e-2

  # Names for values of tuple fields (lora.targets, lora.full), usable as
  # values in the stages and shown in point names.
  config.presets = ml_collections.ConfigDict()
  config.presets.attn = ATTN
  config.presets.all_linear = ALL_LINEAR
  # All linear layers and the unembedding, all with adapters.
  config.presets.all_linear_head = ALL_LINEAR + (r'head/w',)
  # All linear layers and the token embedding.
  config.presets.all_linear_embed = ALL_LINEAR + (r'embed/embeddings',)
  # All linear layers, the token embedding and the unembedding.
  config.presets.all_linear_embed_head = ALL_LINEAR + (r'embed/embeddings', r'head/w')
  # The unembedding trained in full (lora.full).
  config.presets.head = (r'head/.*',)
  # The unembedding and the token embedding trained in full (lora.full).
  config.presets.head_embed = (r'head/.*', r'embed/.*')
  # Nothing (lora.full: no parameter trained in full).
  config.presets.none = ()

  # The best point must train at most this fraction of full fine-tuning's
  # parameters; points above it run and are shown, but are never the best.
  config.max_trainable_fraction = 0.25
  # Fields a stage may name that the config might not have (a finetune config
  # from before DoRA and LoRA+): their points are skipped with a notice. Any
  # other unknown field is an error.
  config.optional_fields = ('lora.use_dora', 'loraplus_lr_ratio')

  # The stages, run in order: on 2 shared CPU cores a point takes minutes,
  # so each refining stage changes one thing from the best point so far.
  config.stages = (
      # The learning rate (the adapters' and the head's) at the config's
      # rank (16) and targets (all linear layers).
      stage('lr', 'config', ('learning_rate.lora', (1e-2, 3e-2))),
      # Rank-stabilized scaling, alpha / sqrt(r): at r=16 4x alpha / r, a
      # larger step for the adapters alone (the head keeps its rate).
      stage('rslora', 'best', ('lora.rslora', (True,))),
      # LayerNorm scales and offsets and the biases trained in full (+3,584).
      stage('vectors', 'best', ('lora.tune_vectors', (True,))),
      # Attention only, against all linear layers.
      stage('targets', 'best', ('lora.targets', ('attn',))),
      # The token embedding gets an adapter too (+r * (256 + 128)).
      stage('embed', 'best', ('lora.targets', ('all_linear_embed',))),
      # The token embedding trained in full instead (+32,768), at half the
      # rank to stay within the budget.
      stage('embed_full', 'best', ('lora.full', ('head_embed',)), ('lora.rank', (8,))),
      # DoRA, and LoRA+ at the best point's rate.
      stage('dora', 'best', ('lora.use_dora', (True,))),
      stage('loraplus', 'best', ('loraplus_lr_ratio', (4.0, 16.0))),
      # LoRA+ at a lower base rate (the `a` factors then learn 4x or 16x
      # faster than the rest, as the LoRA+ paper runs it).
      stage('loraplus_lr', 'best', ('learning_rate.lora', (3e-3,)),
            ('loraplus_lr_ratio', (4.0, 16.0))),
      # The unembedding gets an adapter instead of training in full (-33,024
      # + r * (128 + 256)): the budget then buys rank 20 everywhere (24 is
      # over it).
      stage('head_adapter', 'best', ('lora.full', ('none',)),
            ('lora.targets', ('all_linear_embed_head',)), ('lora.rank', (20, 24))),
      # Beyond the budget, to show where LoRA meets full fine-tuning: higher
      # ranks at the best point (shown, never the best).
      stage('rank', 'best', ('lora.rank', (32, 64))),
  )

  if smoke:
    # The tiny model's head is a third of it: a budget its LoRA fits in.
    config.max_trainable_fraction = 0.5
    config.stages = (
        stage('coarse', 'config', ('learning_rate.lora', (1e-2, 3e-2))),
    )
  return config
