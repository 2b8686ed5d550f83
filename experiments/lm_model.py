"""The base model: a small byte-level Transformer LM in Haiku, built, initialized, loaded.

Pre-LayerNorm decoder blocks (causal ``hk.MultiHeadAttention`` + GELU MLP),
stacked with ``hk.layer_stack`` so every block's parameters share one
``[num_layers, ...]`` array. Parameter paths read, for instance,
``"blocks/__layer_stack_no_per_layer/block/attn/query/w"``
(``[num_layers, d_model, d_model]``) and ``"head/w"`` (the unembedding,
``[d_model, vocab_size]``).

A trained base lives in a directory (a pretraining workdir) as

* ``base.safetensors``: every parameter (written with ``xrapture.save_adapter``
  and a lora spec that marks all of them ``LORA_FULL``);
* ``model.json``: the architecture it was trained with, written last: its
  presence marks a finished base.
"""

import json
import os
from typing import Any

from absl import app
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax
import xrapture

from experiments import atomic

# Bytes: every corpus is read as UTF-8 bytes, one token per byte.
VOCAB_SIZE = 256
BASE = 'base.safetensors'
MODEL = 'model.json'


class Block(hk.Module):
  """One pre-LayerNorm decoder block: causal self-attention, then an MLP."""

  def __init__(self, num_heads: int, mlp_dim: int, name: str | None = None):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.mlp_dim = mlp_dim

  def __call__(self, h: jax.Array) -> jax.Array:
    seq_len, d_model = h.shape[-2:]
    init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'truncated_normal')
    y = hk.LayerNorm(-1, create_scale=True, create_offset=True, name='ln_attn')(h)
    mask = jnp.tril(jnp.ones((1, 1, seq_len, seq_len), bool))
    y = hk.MultiHeadAttention(
        num_heads=self.num_heads, key_size=d_model // self.num_heads,
        w_init=init, name='attn')(y, y, y, mask=mask)
    h = h + y
    y = hk.LayerNorm(-1, create_scale=True, create_offset=True, name='ln_mlp')(h)
    y = hk.nets.MLP([self.mlp_dim, d_model], w_init=init,
                    activation=jax.nn.gelu, name='mlp')(y)
    return h + y


def make_forward(model: ml_collections.ConfigDict):
  """Returns ``forward(tokens [B, T] int32) -> logits [B, T, VOCAB_SIZE]``.

  Args:
    model: ``d_model``, ``num_layers``, ``num_heads``, ``mlp_dim``,
      ``max_len`` (see configs/pretrain.py).
  """
  if model.d_model % model.num_heads:
    raise ValueError(f'd_model={model.d_model} is not a multiple of '
                     f'num_heads={model.num_heads}.')
  d_model, num_layers = model.d_model, model.num_layers
  num_heads, mlp_dim, max_len = model.num_heads, model.mlp_dim, model.max_len

  def forward(tokens: jax.Array) -> jax.Array:
    seq_len = tokens.shape[-1]
    if seq_len > max_len:
      raise ValueError(f'{seq_len} tokens exceed max_len={max_len}.')
    h = hk.Embed(VOCAB_SIZE, d_model, name='embed')(tokens)
    h = h + hk.Embed(max_len, d_model, name='pos_embed')(jnp.arange(seq_len))

    def block(x):
      return Block(num_heads, mlp_dim, name='block')(x)
    with hk.experimental.name_scope('blocks'):
      h = hk.layer_stack(num_layers)(block)(h)
    h = hk.LayerNorm(-1, create_scale=True, create_offset=True, name='ln_f')(h)
    return hk.Linear(VOCAB_SIZE, name='head')(h)
  return forward


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats) of ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def architecture(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields of ``model`` that fix the parameter shapes, as a plain dict."""
  return {k: model[k] for k in
          ('d_model', 'num_layers', 'num_heads', 'mlp_dim', 'max_len')}


def _init(model: ml_collections.ConfigDict) -> Any:
  """``init(rng) -> params`` of the architecture ``model``, traced once (jitted or abstract)."""
  forward = hk.transform(make_forward(model))
  return lambda rng: forward.init(rng, jnp.zeros((1, model.max_len), jnp.int32))


def init_params(model: ml_collections.ConfigDict, seed: int) -> Any:
  """Freshly initialized parameters of the architecture ``model``.

  Jitted: one compilation instead of one dispatch (and compilation) per
  initializer op, with the same values.
  """
  return jax.jit(_init(model))(jax.random.PRNGKey(seed))


def param_shapes(model: ml_collections.ConfigDict) -> Any:
  """The parameters of the architecture ``model`` as ``jax.ShapeDtypeStruct``s (no compute)."""
  return jax.eval_shape(_init(model), jax.random.PRNGKey(0))


def has_base(directory: str) -> bool:
  """Whether ``directory`` holds a finished base (its ``model.json``)."""
  return os.path.exists(os.path.join(directory, MODEL))


def mark_base_finished(directory: str, model: ml_collections.ConfigDict,
                       **record: Any) -> None:
  """Writes ``model.json`` (the architecture and ``record``) next to ``base.safetensors``."""
  atomic.write_json(os.path.join(directory, MODEL), dict(architecture(model), **record))


def load_base(directory: str, model: ml_collections.ConfigDict) -> Any:
  """The base parameters saved in ``directory``, checked against ``model``.

  Raises:
    app.UsageError: there is no base there, or it has another architecture.
  """
  path, model_path = os.path.join(directory, BASE), os.path.join(directory, MODEL)
  if not (os.path.exists(path) and os.path.exists(model_path)):
    raise app.UsageError(
        f'No base model in {directory} (expected {BASE} and {MODEL}, which '
        'experiments/pretrain.py writes when it finishes).')
  with open(model_path) as f:
    saved = json.load(f)
  wanted = architecture(model)
  diff = [f'{k}={saved.get(k)} there, {v} in the config' for k, v in wanted.items()
          if saved.get(k) != v]
  if diff:
    raise app.UsageError(
        f'The base model in {directory} has another architecture: '
        + '; '.join(diff) + '. Set --config.pretrain.model.* to match it, or use '
        'another base (--config.base_checkpoint) or workdir.')
  try:
    params = xrapture.load_adapter(path, param_shapes(model))
  except ValueError as e:
    raise app.UsageError(f'The base model in {directory} does not fit the '
                         f'config\'s architecture: {e}') from e
  missing = ['/'.join(str(k.key) for k in p)  # as 'head/w'
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise app.UsageError(f'The base model in {directory} lacks parameters of the '
                         f'config\'s architecture: {BASE} has no {missing}.')
  return params
