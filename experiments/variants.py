"""The ways to fine-tune the base: LoRA, QLoRA, full fine-tune, head-only.

Each returns a :class:`trainer.Run`: the params to start from, which of them
train (a lora spec tree), the optimizer and the apply function. Only LoRA
changes the model's parameters (targeted kernels become
``xrapture.LoraWeight``); the other two are the baselines LoRA is compared
with, written the way one would without xrapture (full) or with its config
alone (head-only: no adapters, one module trained in full).
"""

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import xrapture

from experiments import trainer

# The keys of the fine-tuning config that change what a method computes;
# a checkpoint written under other values is refused (trainer.Run.fingerprint).
_TRAJECTORY_KEYS = ('seed', 'domain', 'warmup_steps', 'weight_decay',
                    'grad_clip_norm', 'num_steps', 'batch_size', 'seq_len')


def _fingerprint(method: str, config: ml_collections.ConfigDict, **more) -> dict[str, Any]:
  record = {k: config[k] for k in _TRAJECTORY_KEYS}
  record.update(method=method, learning_rate=config.learning_rate[method],
                model=config.pretrain.model.to_dict(), **more)
  return record


def _example(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
  """A batch of tokens as the model takes them, for xrapture to trace apply."""
  return jax.ShapeDtypeStruct((1, config.seq_len), jnp.int32)


def _adapters(name: str, lora_config: ml_collections.ConfigDict,
              config: ml_collections.ConfigDict, forward: Callable[..., jax.Array],
              base_params: Any) -> trainer.Run:
  """Adapters as ``lora_config`` says, trained at ``config.learning_rate[name]``."""
  model = xrapture.transform(forward, lora_config)
  # Layouts come from how the model uses each parameter: kernels stacked by
  # hk.layer_stack are [L, in, out], their biases and norms [L, D] vectors.
  example = _example(config)
  lora_spec = model.lora_spec(base_params, example)
  params = model.adapt(jax.random.PRNGKey(config.seed), base_params, example)
  # LoRA+ (b's learning rate times this ratio), where the config has the field.
  ratio = config.get('loraplus_lr_ratio')
  loraplus = {} if ratio is None else {'loraplus_lr_ratio': ratio}
  tx = xrapture.wrap_optimizer(
      trainer.make_optimizer(config.learning_rate[name], config), lora_spec, **loraplus)
  return trainer.Run(name, model.apply, params, base_params, lora_spec, tx,
                     _fingerprint(name, config, lora=lora_config.to_dict(), **loraplus))


def lora(config: ml_collections.ConfigDict, forward: Callable[..., jax.Array],
         base_params: Any) -> trainer.Run:
  """Adapters on the kernels ``config.lora.targets`` names; the rest frozen."""
  return _adapters('lora', config.lora, config, forward, base_params)


def qlora(config: ml_collections.ConfigDict, forward: Callable[..., jax.Array],
          base_params: Any) -> trainer.Run:
  """The LoRA method on a quantized base (QLoRA): ``config.lora`` with
  ``config.qlora``'s ``quantize``, ``quantize_block`` and ``double_quant``.

  ``model.adapt`` stores every adapted kernel quantized (NF4 codes and
  absmaxes) and ``quantize_frozen`` the other frozen kernels; each step
  dequantizes per use.
  """
  lora_config = config.lora.copy_and_resolve_references()
  lora_config.update(config.qlora.to_dict())
  return _adapters('qlora', lora_config, config, forward, base_params)


def full(config: ml_collections.ConfigDict, forward: Callable[..., jax.Array],
         base_params: Any) -> trainer.Run:
  """Every parameter trained: plain Haiku and optax."""
  lora_spec = jax.tree.map(lambda _: xrapture.LORA_FULL, base_params)
  return trainer.Run('full', hk.transform(forward).apply, base_params, base_params,
                     lora_spec, trainer.make_optimizer(config.learning_rate.full, config),
                     _fingerprint('full', config))


def head(config: ml_collections.ConfigDict, forward: Callable[..., jax.Array],
         base_params: Any) -> trainer.Run:
  """Only the parameters ``config.head`` names train (the unembedding)."""
  head_only = xrapture.default_config()
  head_only.targets = ()
  head_only.full = tuple(config.head)
  lora_spec = xrapture.transform(forward, head_only).lora_spec(base_params, _example(config))
  if xrapture.LORA_FULL not in jax.tree.leaves(lora_spec):
    raise ValueError(f'config.head {tuple(config.head)} matches no parameter.')
  tx = xrapture.wrap_optimizer(
      trainer.make_optimizer(config.learning_rate.head, config),
                               lora_spec)
  return trainer.Run('head', hk.transform(forward).apply, base_params, base_params,
                     lora_spec, tx, _fingerprint('head', config, head=list(config.head)))


METHODS = {'lora': lora, 'qlora': qlora, 'full': full, 'head': head}
