"""The transformer LM every benchmark trains, in Haiku and in torch.

One pre-LayerNorm decoder: token + learned position embeddings, ``n_layers``
blocks of causal multi-head attention (``query``, ``key``, ``value``, ``out``)
and a GELU MLP (``up``, ``down``), a final LayerNorm and an untied ``unembed``.
The same architecture is written three times:

* :func:`forward` — plain Haiku, with ``hk.Linear`` everywhere: the model a
  user has, run unmodified by xrapture, by full fine-tuning and by the bound.
* :func:`forward` with ``linear=naive_lora_linear(...)`` — the hand-written
  LoRA a user would otherwise write: ``x @ W + ((x @ b) @ a) * s`` in the
  targeted layers.
* :class:`TorchLM` — the same network in torch, for HuggingFace PEFT.

:func:`torch_state_dict` copies Haiku parameters into the torch model, so a
benchmark can check that all of them compute the same loss before it times
them.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# The layers that get adapters (PEFT's target_modules, xrapture's targets).
TARGETS = ("query", "key", "value", "out", "up", "down")


@dataclasses.dataclass(frozen=True)
class Config:
  """Model and batch sizes; the defaults are DESIGN.md §4's model."""
  d_model: int = 768
  n_layers: int = 2
  n_heads: int = 12
  mlp_ratio: int = 4
  vocab: int = 1024
  seq_len: int = 128
  batch: int = 4
  rank: int = 8
  alpha: float = 16.0
  # Memory on demand: blocks under ``hk.remat`` with this
  # ``jax.checkpoint_policies`` policy ('nothing_saveable', 'dots_saveable',
  # 'dots_with_no_batch_dims_saveable', ...), every block, or the first k of
  # them as 'policy:k'; '' keeps every activation.
  remat: str = ""

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def target_regex() -> str:
  """The xrapture ``config.targets`` regex for :data:`TARGETS`."""
  return r".*/(" + "|".join(TARGETS) + r")/w"


def dense_linear(size: int, name: str) -> Callable[[jax.Array], jax.Array]:
  return hk.Linear(size, name=name)


class NaiveLoraLinear(hk.Module):
  """Hand-written LoRA: ``x @ w + bias + ((x @ lora_b) @ lora_a) * scale``.

  Parameters ``w`` and ``b`` are named as ``hk.Linear``'s, so the base model's
  parameters drop in; ``lora_b`` ``[in, r]`` starts at zero and ``lora_a``
  ``[r, out]`` at N(0, 0.01²), like xrapture's adapters.
  """

  def __init__(self, size: int, rank: int, scale: float, name: str):
    super().__init__(name=name)
    self.size, self.rank, self.scale = size, rank, scale

  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    w = hk.get_parameter("w", [d_in, self.size], x.dtype,
                         init=hk.initializers.TruncatedNormal(1 / math.sqrt(d_in)))
    bias = hk.get_parameter("b", [self.size], x.dtype, init=jnp.zeros)
    lora_b = hk.get_parameter("lora_b", [d_in, self.rank], x.dtype, init=jnp.zeros)
    lora_a = hk.get_parameter("lora_a", [self.rank, self.size], x.dtype,
                              init=hk.initializers.RandomNormal(0.01))
    return x @ w + bias + ((x @ lora_b) @ lora_a) * self.scale


def naive_lora_linear(cfg: Config):
  """A ``linear`` factory for :func:`forward`: NaiveLoraLinear on TARGETS."""
  def make(size, name):
    if name in TARGETS:
      return NaiveLoraLinear(size, cfg.rank, cfg.scale, name=name)
    return hk.Linear(size, name=name)
  return make


def embed(tokens: jax.Array, cfg: Config) -> jax.Array:
  """Token plus position embeddings, ``[B, T, d]``."""
  table = hk.Embed(cfg.vocab, cfg.d_model, name="embed")
  pos = hk.get_parameter("pos_embed", [cfg.seq_len, cfg.d_model],
                         init=hk.initializers.TruncatedNormal(0.02))
  return table(tokens) + pos[:tokens.shape[1]]


def _attention(h, cfg, linear):
  b, t, d = h.shape
  heads, head_dim = cfg.n_heads, d // cfg.n_heads
  split = lambda x: x.reshape(b, t, heads, head_dim)
  q = split(linear(d, "query")(h))
  k = split(linear(d, "key")(h))
  v = split(linear(d, "value")(h))
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  logits = jnp.where(causal, logits, jnp.asarray(-1e30, logits.dtype))
  weights = jax.nn.softmax(logits, axis=-1)
  mixed = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
  return linear(d, "out")(mixed)


def _layer_norm(name):
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def forward(tokens: jax.Array, h0: jax.Array | None = None, *, cfg: Config,
            linear: Callable[[int, str], Any] = dense_linear) -> jax.Array:
  """Logits ``[B, T, vocab]``; from embeddings ``h0`` instead when given."""
  h = embed(tokens, cfg) if h0 is None else h0

  def block(h):
    h = h + _attention(_layer_norm("ln_attn")(h), cfg, linear)
    y = _layer_norm("ln_mlp")(h)
    y = jax.nn.gelu(linear(cfg.mlp_ratio * cfg.d_model, "up")(y))
    return h + linear(cfg.d_model, "down")(y)

  policy, _, count = cfg.remat.partition(":")
  remat_block = (hk.remat(block, policy=getattr(jax.checkpoint_policies, policy))
                 if policy else block)
  n_remat = int(count) if count else cfg.n_layers
  for i in range(cfg.n_layers):
    with hk.name_scope(f"layer_{i}"):
      h = (remat_block if i < n_remat else block)(h)
  return hk.Linear(cfg.vocab, name="unembed")(_layer_norm("ln_final")(h))


def dense_model(cfg: Config) -> hk.Transformed:
  return hk.transform(functools.partial(forward, cfg=cfg))


def naive_lora_model(cfg: Config) -> hk.Transformed:
  return hk.transform(functools.partial(forward, cfg=cfg,
                                        linear=naive_lora_linear(cfg)))


def embed_model(cfg: Config) -> hk.Transformed:
  """Only the embeddings, with the same parameter names as :func:`forward`."""
  return hk.transform(functools.partial(embed, cfg=cfg))


def loss_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def batch(cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random ``(tokens, targets)``, int32 ``[B, T]`` each."""
  rng = np.random.default_rng(seed)
  shape = (cfg.batch, cfg.seq_len)
  return (rng.integers(0, cfg.vocab, shape, dtype=np.int32),
          rng.integers(0, cfg.vocab, shape, dtype=np.int32))


def param_count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def layer_paths(cfg: Config) -> list[str]:
  """Haiku module paths of the targeted kernels, ``layer_i/name``."""
  return [f"layer_{i}/{name}" for i in range(cfg.n_layers) for name in TARGETS]


# ------------------------------------------------------------------- torch --

def torch_model(cfg: Config):
  """A :class:`TorchLM` (imported lazily: torch is optional)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
      self.ln_attn = nn.LayerNorm(d, eps=1e-5)
      self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
      self.ln_mlp = nn.LayerNorm(d, eps=1e-5)
      self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, h):
      b, t, d = h.shape
      heads, head_dim = cfg.n_heads, d // cfg.n_heads
      y = self.ln_attn(h)
      split = lambda x: x.view(b, t, heads, head_dim)
      q, k, v = split(self.query(y)), split(self.key(y)), split(self.value(y))
      logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
      causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
      logits = logits.masked_fill(~causal, -1e30)
      mixed = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v).reshape(b, t, d)
      h = h + self.out(mixed)
      return h + self.down(F.gelu(self.up(self.ln_mlp(h)), approximate="tanh"))

  class TorchLM(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
      self.pos_embed = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
      self.layers = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
      self.ln_final = nn.LayerNorm(cfg.d_model, eps=1e-5)
      self.unembed = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens):
      h = self.embed(tokens) + self.pos_embed[:tokens.shape[1]]
      for layer in self.layers:
        h = layer(h)
      return self.unembed(self.ln_final(h))

  return TorchLM()


def torch_state_dict(params: Any, cfg: Config) -> dict[str, np.ndarray]:
  """The dense Haiku ``params`` as a :class:`TorchLM` state dict (numpy)."""
  p = jax.tree.map(np.asarray, params)
  linear = lambda mod: {"weight": p[mod]["w"].T, "bias": p[mod]["b"]}
  norm = lambda mod: {"weight": p[mod]["scale"], "bias": p[mod]["offset"]}
  state = {"embed.weight": p["embed"]["embeddings"], "pos_embed": p["~"]["pos_embed"]}
  for key, value in linear("unembed").items():
    state[f"unembed.{key}"] = value
  for key, value in norm("ln_final").items():
    state[f"ln_final.{key}"] = value
  for i in range(cfg.n_layers):
    for name in TARGETS:
      for key, value in linear(f"layer_{i}/{name}").items():
        state[f"layers.{i}.{name}.{key}"] = value
    for name in ("ln_attn", "ln_mlp"):
      for key, value in norm(f"layer_{i}/{name}").items():
        state[f"layers.{i}.{name}.{key}"] = value
  return {k: np.ascontiguousarray(v) for k, v in state.items()}
