"""PiSSA initialization (Meng et al. 2024; PEFT's ``init_lora_weights="pissa"``).

The adapter starts as the top-``r`` singular directions of the kernel and the
kernel keeps the residual: with ``W = U S Vᵀ`` the SVD of the grouped matrix
``[prod(in), prod(out)]`` (per stacked element), ``b = U_r·sqrt(S_r / s)``,
``a = sqrt(S_r / s)·V_rᵀ`` and ``w = W - s·b@a``, so ``w + s·b@a = W``: the
adapted model starts equal to the base, and training moves the principal
directions. The SVD runs in float32 (or wider); factors take the adapter
dtype, the residual the kernel's.

A PiSSA model's base params are the residual, and its LoraWeights say so
(``residual=True``): ``save_adapter`` records a sample of each residual, and
``load_adapter`` refuses the file on other kernels (the original base). To
use the adapter on the original base, convert it to plain LoRA relative to
that base, as PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` does:
``ΔW = s·(b@a - b₀@a₀)``, rank ``2r`` factors ``[b | b₀]`` and
``[a; -a₀]`` with alpha doubled (``√2·alpha`` with rsLoRA) so the scale is
unchanged (:func:`to_plain_lora`; ``save_adapter(..., initial=...)``,
``export_peft(..., initial=...)``).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xrapture._src.lora import dora
from xrapture._src.lora import lora_weight

LoraWeight = lora_weight.LoraWeight
INITS = ("default", "pissa")


def pissa_init(lora: LoraWeight) -> LoraWeight:
  """``lora``'s kernel split into its top-``r`` part (the adapter) and the residual.

  ``lora`` gives the kernel, layout, rank, alpha, rsLoRA and the factors'
  dtype; its factors' values are ignored. The result is marked
  ``residual``: its factors fit its ``w`` only.
  """
  layout = lora_weight.layout_of(lora)
  stack, _, _ = lora_weight.groups(layout)
  m, n = lora.grouped_shape
  r, scale = lora.rank, lora.get_scale()
  # The grouped matrix per stacked element: w's axes as (stacked, in, out).
  s_ins_outs = sum(lora_weight.groups(layout), ())
  dtype = jnp.promote_types(lora.w.dtype, jnp.float32)
  w = jnp.transpose(lora.w.astype(dtype), s_ins_outs)
  s_shape = w.shape[:len(stack)]
  u, sv, vh = jnp.linalg.svd(w.reshape(s_shape + (m, n)), full_matrices=False)
  root = jnp.sqrt(sv[..., :r] / scale)
  b = u[..., :r] * root[..., None, :]                       # [*S, M, r]
  a = root[..., :, None] * vh[..., :r, :]                   # [*S, r, N]
  a_shape, b_shape = lora_weight.factor_shapes(tuple(lora.shape), layout, r)
  a = a.reshape(a_shape).astype(lora.a.dtype)
  b = b.reshape(b_shape).astype(lora.b.dtype)
  top = lora.replace(a=a, b=b).delta()
  residual = (lora.w.astype(dtype) - top.astype(dtype)).astype(lora.w.dtype)
  return lora.replace(w=residual, a=a, b=b, residual=True)


def same_kernel(x, y) -> bool:
  """Equal kernels, also quantized ones (QLoRA): equal pieces."""
  try:
    same = jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), x, y)
  except ValueError:  # another structure: dense and quantized, or quantized otherwise
    return False
  return all(jax.tree.leaves(same))


def to_plain_lora(trained: LoraWeight, initial: LoraWeight | None) -> LoraWeight:
  """A PiSSA adapter as plain LoRA on the original kernel ``w + s·b₀@a₀``.

  Returns a LoraWeight of rank ``2r`` whose update is
  ``s·(b@a - b₀@a₀)`` (same scale: alpha doubled, ``√2·alpha`` with
  rsLoRA), not marked ``residual``; its ``w`` is ``trained.w`` (the
  residual), kept for its shape.

  Raises:
    ValueError: ``initial`` is not ``trained``'s starting point (different
      residual kernel, shape, rank, alpha or layout).
  """
  if (not isinstance(initial, LoraWeight) or initial.shape != trained.shape
      or initial.rank != trained.rank or initial.alpha != trained.alpha
      or initial.rslora != trained.rslora
      or lora_weight.layout_of(initial) != lora_weight.layout_of(trained)
      or not same_kernel(initial.w, trained.w)):
    raise ValueError(
        "the initial adapter does not belong to this trained one: pass the params "
        "model.adapt returned (before training); their residual kernel w, shape, "
        "rank, alpha and layout must be the trained params'.")
  stack, _, _ = trained.groups
  b = jnp.concatenate([trained.b, initial.b.astype(trained.b.dtype)], axis=-1)
  a = jnp.concatenate([trained.a, -initial.a.astype(trained.a.dtype)], axis=len(stack))
  alpha = trained.alpha * (2 ** 0.5 if trained.rslora else 2.0)
  return LoraWeight(trained.w, a, b, alpha=alpha, rslora=trained.rslora,
                    layout=lora_weight.layout_of(trained))


def check_init(name: str) -> None:
  if name not in INITS:
    raise ValueError(f"config.init must be one of {INITS}, got {name!r}.")


def initialize(lora: LoraWeight, name: str) -> LoraWeight:
  """``lora`` (default-initialized) under the ``config.init`` named ``name``."""
  check_init(name)
  return pissa_init(lora) if name == "pissa" else lora


def plain_for_original(name: str, adapter: Any, initial: Mapping[str, Any]) -> LoraWeight:
  """The adapter at path ``name`` as plain LoRA on the original base.

  What ``save_adapter(..., initial=)`` and ``export_peft(..., initial=)``
  write: :func:`to_plain_lora` of ``adapter`` and its starting point
  ``initial[name]`` (``initial``: the params ``model.adapt`` returned, by
  path).

  Raises:
    ValueError: naming ``name``: ``adapter`` is DoRA (PEFT converts
      lora_A/lora_B only), or ``initial[name]`` is missing or not its start.
  """
  if isinstance(adapter, dora.DoraWeight):
    raise ValueError(f"'{name}' is a DoRA adapter: initial= converts LoRA adapters to "
                     "plain LoRA relative to the original base (as PEFT converts "
                     "lora_A/lora_B only); save DoRA adapters without it.")
  try:   # a missing start is None, which to_plain_lora says does not belong
    return to_plain_lora(adapter, initial.get(name))
  except ValueError as e:
    raise ValueError(f"initial params for '{name}': {e}") from e
