"""LoRA+ (Hayou et al. 2024): a larger learning rate for one LoRA factor.

PEFT's ``create_loraplus_optimizer`` gives ``lora_B`` (and every trainable
1-D parameter: DoRA magnitudes, biases) the learning rate
``lr · loraplus_lr_ratio`` and ``lora_A`` (and other parameters) ``lr``.
PEFT's ``lora_B`` is xrapture's ``a`` transposed (``lora_A = bᵀ``,
``lora_B = aᵀ``), the factor on the output side, whose fan-in is the rank:
the one LoRA+'s width analysis says must learn faster. (PEFT starts
``lora_B`` at zero; xrapture starts the other factor, ``b``, at zero. The
ratio follows the role, not the initialization.)

Scaling an optimizer's final update by the ratio is scaling its learning
rate (for Adam, AdamW with its decoupled decay, SGD, ...), so this is a
transformation chained after the wrapped optimizer.
"""

import jax
import jax.numpy as jnp
import optax

from xrapture._src.implicit import implicit_array
from xrapture._src.lora import dora

# Fields of an adapter scaled by the ratio: PEFT's lora_B and DoRA's magnitude.
FAST_FIELDS = ("a", "magnitude")


def _scale(ratio, updates):
  def one(x):
    if dora.is_adapter(x):
      return implicit_array.map_fields(
          lambda name, u: u * jnp.asarray(ratio, u.dtype)
          if name in FAST_FIELDS and hasattr(u, "dtype") else u, x)
    if hasattr(x, "ndim") and x.ndim == 1:        # biases, norms: PEFT's groupB
      return x * jnp.asarray(ratio, x.dtype)
    return x
  return jax.tree_util.tree_map(one, updates, is_leaf=dora.is_adapter)


def scale_loraplus(ratio: float) -> optax.GradientTransformation:
  """Multiplies the updates of every adapter's ``a`` and ``magnitude`` and of
  1-D leaves by ``ratio``; other updates pass unchanged."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return _scale(float(ratio), updates), state
  return optax.GradientTransformation(init_fn, update_fn)
