"""wrap_optimizer: an optax optimizer that trains adapters and LORA_FULL leaves."""

from typing import Any

import jax
import optax

from xrapture._src import pytypes
from xrapture._src.implicit import implicit_array
from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight
from xrapture._src.optim import freeze
from xrapture._src.optim import precision
from xrapture._src.optim import loraplus

LoraWeight = lora_weight.LoraWeight


def frozen_flags(lora_spec: Any, params: Any) -> Any:
  """True where frozen: ``LORA_FREEZE`` leaves and every LoraWeight's ``w``."""
  def one(rank, value):
    if dora.is_adapter(value):
      return implicit_array.map_fields(lambda name, _: name == "w", value)
    return jax.tree.map(lambda _: rank == lora_weight.LORA_FREEZE, value)
  return jax.tree.map(one, lora_spec, params, is_leaf=lora_weight.is_spec_leaf)


def wrap_optimizer(tx: optax.GradientTransformation, lora_spec: pytypes.LoraSpec,
                   use_scalar_zeros: bool = False,
                   loraplus_lr_ratio: float | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` to update only adapters (``a``, ``b``) and ``LORA_FULL`` leaves.

  Examples:
    >>> import haiku as hk, jax, jax.numpy as jnp, optax, xrapture
    >>> config = xrapture.default_config()
    >>> config.rank = 2
    >>> model = xrapture.transform(lambda x: hk.Linear(4)(x), config)
    >>> x = jnp.ones([1, 8])
    >>> base = model.init(jax.random.PRNGKey(0), x)
    >>> params = model.adapt(jax.random.PRNGKey(1), base)
    >>> tx = xrapture.wrap_optimizer(optax.adam(1e-2), model.lora_spec(base))
    >>> opt_state = tx.init(params)  # Adam moments for a and b only
    >>> grads = jax.grad(lambda p: jnp.sum(model.apply(p, None, x) ** 2))(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> changed = jax.tree.map(lambda n, o: bool((n != o).any()), new, params)
    >>> changed["linear"]["b"], changed["linear"]["w"].w  # frozen
    (False, False)
    >>> changed["linear"]["w"].b  # trained (a gets no gradient while b is 0)
    True

  Args:
    tx: the optimizer for the trainable leaves.
    lora_spec: one entry per base parameter, as ``model.lora_spec(base_params)``
      returns (a prefix of the adapted tree).
    use_scalar_zeros: frozen leaves get scalar zero updates.
    loraplus_lr_ratio: LoRA+ as PEFT's ``create_loraplus_optimizer``: the
      updates of every adapter's ``a`` (PEFT's ``lora_B``), DoRA
      ``magnitude`` and trainable 1-D leaf are multiplied by this ratio (for
      Adam-like optimizers, their learning rate is); None: off.

  Returns:
    An optimizer whose state holds nothing for ``w`` and frozen leaves, and
    whose updates for them are zeros. For float16 / bfloat16 leaves ``tx``
    runs in float32 (float32 state; updates in the leaf's dtype): Adam's
    ``eps`` underflows in float16.
  """
  if loraplus_lr_ratio is not None:
    tx = optax.chain(tx, loraplus.scale_loraplus(loraplus_lr_ratio))
  return freeze.freeze_subtrees(
      precision.float32_math(tx), lambda params: frozen_flags(lora_spec, params),
      use_scalar_zeros)
