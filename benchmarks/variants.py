"""The training steps the benchmarks compare, each holding its own state.

* ``full``     — dense fine-tuning: every parameter differentiated, Adam on all.
* ``bound``    — forward plus input gradients only: the gradient of the loss
  with respect to the embedded activations, the parameters passed as jit
  arguments but not differentiated. No LoRA step can do less work.
* ``naive``    — hand-written Haiku LoRA (:class:`lm.NaiveLoraLinear`),
  differentiated with respect to the adapters only, Adam on the adapters.
* ``xrapture`` — the unmodified model through ``xrapture.transform``,
  ``model.adapt``, ``xrapture.wrap_optimizer`` and ``jax.grad`` of the whole
  params tree: exactly what the README shows a user.
* ``qlora``    — the same on a base stored quantized (``xrapture.quantize``,
  NF4 or int8), differentiated with ``jax.grad(allow_int=True)``.
* ``peft``     — HuggingFace PEFT LoRA on the same network in torch, Adam.

All LoRA variants start from the same base weights and the same adapter
values (``b`` made non-zero so that the low-rank path counts), so their losses
agree step by step; :func:`check_agreement` says whether they do.

Parameters always enter jit as arguments (never closed over: XLA would fold
constant weights into the program and time something no trainer runs). The
state a step replaces (params, optimizer state) is donated.
"""

import functools
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xrapture

from benchmarks import lm

LEARNING_RATE = 1e-3


class JaxVariant:
  """A jitted ``step(state, consts, batch) -> (state, (loss, ...))`` and its state.

  Attributes:
    name: the variant's name.
    trainable: number of trained values.
    opt_state_bytes: bytes held by the optimizer state.
  """

  def __init__(self, name: str, make_step: Callable[[], Callable[..., Any]],
               state: Any, consts: Any, batch: Any, trainable: int,
               opt_state: Any = ()):
    self.name = name
    self.make_step = make_step
    self.state, self.consts, self.batch = state, consts, batch
    self.trainable = trainable
    self.opt_state_bytes = lm.tree_bytes(opt_state)
    self._step = self.jit()

  def jit(self):
    """A fresh jit of a fresh step function (nothing cached)."""
    return jax.jit(self.make_step(), donate_argnums=(0,))

  def lower(self):
    return self.jit().lower(self.state, self.consts, self.batch)

  def step(self) -> float:
    self.state, aux = self._step(self.state, self.consts, self.batch)
    jax.block_until_ready((self.state, aux))
    return aux[0]


def _train_step(loss_fn, tx, allow_int=False):
  """``(params, opt_state), consts, batch -> new state, (loss,)``.

  ``allow_int``: params hold integer leaves (a quantized base's codes), whose
  gradients are ``float0``.
  """
  def step(state, consts, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn, allow_int=allow_int)(params, consts, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (loss,)
  return step


def _copy(tree, copy=True):
  """Fresh buffers: a donated state must not share them with another variant.

  ``copy=False`` (one variant per process, as the memory benchmark runs) hands
  the caller's buffers over instead; the caller must not use them again.
  """
  return jax.tree.map(jnp.copy, tree) if copy else tree


def full(cfg: lm.Config, base: Any, batch: Any, copy: bool = True) -> JaxVariant:
  apply = lm.dense_model(cfg).apply
  tx = optax.adam(LEARNING_RATE)

  def make_step():
    def loss_fn(params, consts, tokens, targets):
      del consts
      return lm.loss_from_logits(apply(params, None, tokens), targets)
    return _train_step(loss_fn, tx)

  params = _copy(base, copy)
  opt_state = tx.init(params)
  return JaxVariant("full", make_step, (params, opt_state), (), batch,
                    lm.param_count(params), opt_state)


def bound(cfg: lm.Config, base: Any, batch: Any) -> JaxVariant:
  apply = lm.dense_model(cfg).apply
  embed = lm.embed_model(cfg).apply

  def make_step():
    def step(state, params, batch):
      tokens, targets = batch
      h0 = embed(params, None, tokens)
      loss_of_h0 = lambda h: lm.loss_from_logits(apply(params, None, tokens, h), targets)
      loss, grad_h0 = jax.value_and_grad(loss_of_h0)(h0)
      return state, (loss, grad_h0)
    return step

  return JaxVariant("bound", make_step, (), _copy(base), batch, 0)


def lora_config(cfg: lm.Config):
  config = xrapture.default_config()
  config.rank, config.alpha = cfg.rank, cfg.alpha
  config.targets = (lm.target_regex(),)
  return config


def adapted_params(cfg: lm.Config, base: Any, seed: int = 1) -> Any:
  """``model.adapt(rng, base)``, then ``b`` drawn non-zero (same for every variant)."""
  model = xrapture.transform(functools.partial(lm.forward, cfg=cfg), lora_config(cfg))
  params = model.adapt(jax.random.PRNGKey(seed), base)
  rng = np.random.default_rng(seed)

  def nonzero_b(x):
    if isinstance(x, xrapture.LoraWeight):
      b = rng.normal(0.0, 0.01, x.b.shape).astype(np.dtype(x.b.dtype))
      return x.replace(b=jnp.asarray(b))
    return x
  return xrapture.tree_map_with_implicit(nonzero_b, params)


def xrapture_variant(cfg: lm.Config, base: Any, adapted: Any, batch: Any,
                     copy: bool = True, name: str = "xrapture",
                     flat_optimizer: bool = False) -> JaxVariant:
  """The unmodified model through xrapture's public API, as a user writes it.

  With ``cfg.remat`` set (the ``xrapture_remat`` variant), each block of the
  model runs under ``hk.remat`` with that policy. ``flat_optimizer``: Adam
  under ``optax.flatten`` (one vector of every trainable value; the README's
  CPU tip).
  """
  config = lora_config(cfg)
  forward = functools.partial(lm.forward, cfg=cfg)
  model = xrapture.transform(forward, config)
  adam = optax.adam(LEARNING_RATE)
  tx = xrapture.wrap_optimizer(optax.flatten(adam) if flat_optimizer else adam,
                               model.lora_spec(base))

  def make_step():
    fresh = xrapture.transform(forward, config)  # a fresh trace cache, for compile timing

    def loss_fn(params, consts, tokens, targets):
      del consts
      return lm.loss_from_logits(fresh.apply(params, None, tokens), targets)
    return _train_step(loss_fn, tx)

  params = _copy(adapted, copy)
  opt_state = tx.init(params)
  trainable = sum(x.a.size + x.b.size for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))
                  if isinstance(x, xrapture.LoraWeight))
  return JaxVariant(name, make_step, (params, opt_state), (), batch,
                    trainable, opt_state)


def quantized_params(cfg: lm.Config, adapted: Any, scheme: str,
                     double_quant: bool = False, block: int = 64) -> Any:
  """``adapted`` with its whole base quantized (QLoRA).

  The adapted kernels' ``w``, and the frozen kernels and embedding table
  (``config.quantize_frozen``); every leaf a fresh JAX array, sharing no
  buffer with ``adapted``.
  """
  config = lora_config(cfg)
  config.quantize, config.double_quant, config.quantize_block = scheme, double_quant, block
  config.quantize_frozen = (r".*/w", r".*/embeddings")
  return jax.tree.map(jnp.array, xrapture.quantize(adapted, config))


def qlora_variant(cfg: lm.Config, base: Any, quantized: Any, batch: Any,
                  name: str = "qlora") -> JaxVariant:
  """:func:`xrapture_variant` on a quantized base: ``jax.grad(allow_int=True)``."""
  config = lora_config(cfg)
  forward = functools.partial(lm.forward, cfg=cfg)
  tx = xrapture.wrap_optimizer(optax.adam(LEARNING_RATE),
                               xrapture.transform(forward, config).lora_spec(base))

  def make_step():
    fresh = xrapture.transform(forward, config)

    def loss_fn(params, consts, tokens, targets):
      del consts
      return lm.loss_from_logits(fresh.apply(params, None, tokens), targets)
    return _train_step(loss_fn, tx, allow_int=True)

  opt_state = tx.init(quantized)
  trainable = sum(x.a.size + x.b.size for x in jax.tree.leaves(
      quantized, is_leaf=lambda x: isinstance(x, xrapture.LoraWeight))
                  if isinstance(x, xrapture.LoraWeight))
  return JaxVariant(name, make_step, (quantized, opt_state), (), batch, trainable,
                    opt_state)


def naive_params(cfg: lm.Config, adapted: Any) -> Any:
  """The naive model's params: base ``w``/``b`` plus ``lora_a``/``lora_b``."""
  out = {}
  for module, leaves in adapted.items():
    out[module] = {}
    for name, value in leaves.items():
      if isinstance(value, xrapture.LoraWeight):
        out[module].update(w=value.w, lora_a=value.a, lora_b=value.b)
      else:
        out[module][name] = value
  return out


def naive(cfg: lm.Config, adapted: Any, batch: Any, copy: bool = True) -> JaxVariant:
  apply = lm.naive_lora_model(cfg).apply
  tx = optax.adam(LEARNING_RATE)
  is_adapter = lambda module, name, value: name in ("lora_a", "lora_b")
  trainable, frozen = hk.data_structures.partition(
      is_adapter, _copy(naive_params(cfg, adapted), copy))

  def make_step():
    def loss_fn(trainable, frozen, tokens, targets):
      params = hk.data_structures.merge(frozen, trainable)
      return lm.loss_from_logits(apply(params, None, tokens), targets)
    return _train_step(loss_fn, tx)

  opt_state = tx.init(trainable)
  return JaxVariant("naive", make_step, (trainable, opt_state), frozen, batch,
                    lm.param_count(trainable), opt_state)


def default_torch_device() -> str:
  """Where PEFT runs beside JAX: CUDA when JAX's backend is a GPU, else the CPU."""
  return "cuda" if jax.default_backend() == "gpu" else "cpu"


class PeftVariant:
  """HuggingFace PEFT LoRA on :func:`lm.torch_model`, torch Adam."""

  name = "peft"

  def __init__(self, cfg: lm.Config, batch: Any, threads: int, device: str = "cpu",
               base: Any = None, adapted: Any = None):
    """Builds the model; with ``base``/``adapted`` (Haiku trees), copies their
    weights in, else keeps torch's initialization (enough to measure memory)."""
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
      # JAX's default f32 matmul precision on GPUs is TF32; torch's is full
      # f32. Compare like with like: TF32 in both.
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
    self._torch, self._F, self._device = torch, F, device
    model = lm.torch_model(cfg)
    if base is not None:
      model.load_state_dict({k: torch.from_numpy(v)
                             for k, v in lm.torch_state_dict(base, cfg).items()})
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                             target_modules=list(lm.TARGETS), lora_dropout=0.0,
                             bias="none")
    self.model = peft.get_peft_model(model, config).to(device)
    # xrapture's b [in, r] is PEFT's lora_A.weightᵀ; a [r, out] is lora_B.weightᵀ.
    for name, module in self.model.named_modules():
      if adapted is not None and isinstance(module, peft.tuners.lora.Linear):
        path = name.split("model.", 2)[-1].replace("layers.", "layer_").replace(".", "/")
        lora = adapted[path]["w"]
        with torch.no_grad():
          module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(lora.b).T.copy()))
          module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(lora.a).T.copy()))
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.trainable = sum(p.numel() for p in trainable)
    self.optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    tokens, targets = batch
    self.tokens = torch.from_numpy(np.asarray(tokens)).long().to(device)
    self.targets = torch.from_numpy(np.asarray(targets)).long().to(device)

  @property
  def opt_state_bytes(self) -> int:
    total = 0
    for state in self.optimizer.state.values():
      for value in state.values():
        if self._torch.is_tensor(value):
          total += value.numel() * value.element_size()
    return total

  def step(self) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    logits = self.model(self.tokens)
    loss = self._F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 self.targets.reshape(-1))
    loss.backward()
    self.optimizer.step()
    if self._device != "cpu":
      self._torch.cuda.synchronize()
    return loss.detach()


def check_agreement(losses: dict[str, list[float]], groups: list[list[str]],
                    rtol: float = 2e-3) -> dict[str, Any]:
  """Whether variants in each group computed the same losses, step by step."""
  report = {"ok": True, "rtol": rtol, "losses": losses}
  for group in groups:
    present = [name for name in group if name in losses]
    ref = np.asarray(losses[present[0]], np.float64)
    for name in present[1:]:
      err = float(np.max(np.abs(np.asarray(losses[name], np.float64) - ref) / np.abs(ref)))
      report[f"{name}_vs_{present[0]}_max_rel"] = err
      report["ok"] &= err <= rtol
  return report
