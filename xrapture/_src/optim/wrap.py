"""wrap_optimizer: an optax optimizer that trains adapters and LORA_FULL leaves."""

from typing import Any

import jax
import optax

from xrapture._src.implicit import implicit_array
from xrapture._src.lora import lora_weight
from xrapture._src.optim import freeze
from xrapture._src.optim import precision

LoraWeight = lora_weight.LoraWeight


def frozen_flags(lora_spec: Any, params: Any) -> Any:
  """True where frozen: ``LORA_FREEZE`` leaves and every LoraWeight's ``w``."""
  def one(rank, value):
    if isinstance(value, LoraWeight):
      return implicit_array.map_fields(lambda name, _: name == "w", value)
    return jax.tree.map(lambda _: rank == lora_weight.LORA_FREEZE, value)
  return jax.tree.map(one, lora_spec, params, is_leaf=lora_weight.is_spec_leaf)


def wrap_optimizer(tx: optax.GradientTransformation, lora_spec: Any,
                   use_scalar_zeros: bool = False) -> optax.GradientTransformation:
  """Wraps ``tx`` to update only adapters (``a``, ``b``) and ``LORA_FULL`` leaves.

  Examples:
    >>> import optax, xrapture
    >>> # lora_spec = model.spec(base_params); params = model.adapt(rng, base_params)
    >>> # tx = xrapture.wrap_optimizer(optax.adamw(1e-3), lora_spec)
    >>> # opt_state = tx.init(params)  # Adam moments for a, b (and full) only

  Args:
    tx: the optimizer for the trainable leaves.
    lora_spec: one entry per base parameter, as ``model.spec(base_params)``
      returns (a prefix of the adapted tree).
    use_scalar_zeros: frozen leaves get scalar zero updates.

  Returns:
    An optimizer whose state holds nothing for ``w`` and frozen leaves, and
    whose updates for them are zeros. For float16 / bfloat16 leaves ``tx``
    runs in float32 (float32 state; updates in the leaf's dtype): Adam's
    ``eps`` underflows in float16.
  """
  return freeze.freeze_subtrees(
      precision.float32_math(tx), lambda params: frozen_flags(lora_spec, params),
      use_scalar_zeros)
