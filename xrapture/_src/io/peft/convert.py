"""LoRA factors and whole weights between Haiku's layouts and torch's.

Layouts (``s`` = alpha/r, or alpha/sqrt(r) with rsLoRA). A Haiku kernel
``w [in, out]`` computes ``x @ w``; its LoraWeight adds ``s · b @ a`` with
``b [in, r]`` and ``a [r, out]``. torch's ``nn.Linear`` holds ``W [out, in]``
and PEFT adds ``s · lora_B @ lora_A``, so ``lora_B @ lora_A = (b @ a)ᵀ =
aᵀ @ bᵀ``::

  nn.Linear      lora_A.weight [r, in]   = bᵀ     lora_B.weight [out, r] = aᵀ
  nn.Embedding   lora_embedding_A [r, V] = bᵀ     lora_embedding_B [D, r] = aᵀ
  nn.ConvNd      lora_A.weight [r, in, *k] = b [*k, in, r] with axes reversed
                 lora_B.weight [out, r, 1..] = a [1.., r, out] with axes reversed

DoRA adapters (:class:`xrapture.DoraWeight`) add PEFT's
``<module>.lora_magnitude_vector``: ``[out]`` for ``nn.Linear`` and
``nn.Embedding``, ``[1, out, 1..]`` for ``nn.ConvNd``, and ``"use_dora": true``.

``hk.Embed``'s table ``[V, D]`` and ``nn.Embedding``'s ``[V, D]`` have the same
layout, and PEFT's embedding update is ``s · Aᵀ @ Bᵀ``, hence the same rule.
For convolutions PEFT's ``lora_A`` is a conv with the base layer's window and
``lora_B`` a 1×1 conv; xrapture's matching layout is ``b`` spanning the window
and ``a`` pointwise (what :meth:`LoraTransformed.adapt` creates).
"""

import math
from typing import Sequence

import numpy as np

from xrapture._src.lora import lora_weight
from xrapture._src.transform import config as config_lib

STACK, IN, OUT = lora_weight.STACK, lora_weight.IN, lora_weight.OUT


def _is_conv_layout(layout: str) -> bool:
  """A conv kernel's layout in Haiku's HWIO: window and input channels in, then out."""
  return len(layout) > 2 and layout == IN * (len(layout) - 1) + OUT


def _kind(haiku_path: str, layout: str, linear: Sequence[str] = ()) -> str:
  """The torch side of a (per-layer) kernel: embedding, linear, conv or experts.

  A kernel with more than two axes whose last two are in, out is taken for
  an HWIO conv kernel unless ``linear`` names it.
  """
  if STACK in layout:
    return "experts"
  if haiku_path.rsplit("/", 1)[-1] == "embeddings" and len(layout) == 2:
    return "embedding"
  if (len(layout) > 2 and layout.endswith(IN + OUT)
      and not config_lib.matches_any(linear, haiku_path)):
    return "conv"
  return "linear"


def _reverse_axes(x: np.ndarray) -> np.ndarray:
  """``[*lead, M, N]`` <-> ``[N, M, *lead]`` (Haiku HWIO <-> torch OIHW)."""
  nd = x.ndim
  return np.transpose(x, (nd - 1, nd - 2) + tuple(range(nd - 2)))


def _unreverse_axes(x: np.ndarray) -> np.ndarray:
  nd = x.ndim
  return np.transpose(x, tuple(range(2, nd)) + (1, 0))


def _sizes(w_shape, layout, role) -> tuple[int, ...]:
  return tuple(n for n, c in zip(w_shape, layout) if c == role)


def _to_peft(kind: str, haiku_path: str, w_shape, layout: str, a, b
             ) -> tuple[np.ndarray, np.ndarray]:
  """Haiku factors of one (per-layer) kernel -> PEFT's (A, B)."""
  a, b = np.asarray(a), np.asarray(b)  # gathered by the caller
  r = b.shape[-1]
  ins, outs = math.prod(_sizes(w_shape, layout, IN)), math.prod(_sizes(w_shape, layout, OUT))
  if kind == "embedding" and layout == OUT + IN:   # the table's rows are the out group
    return a, b
  if kind in ("linear", "embedding"):
    # nn.Linear(prod(in), prod(out)), the groups flattened in Haiku's axis order.
    return b.reshape(ins, r).T, a.reshape(r, outs).T
  if kind == "conv":
    if not _is_conv_layout(layout):
      raise ValueError(
          f"Cannot export '{haiku_path}' (kernel {tuple(w_shape)}, layout {layout!r}, "
          f"a {a.shape}, b {b.shape}) to PEFT: PEFT's conv LoRA needs b to span the "
          f"window with the input channels and a to be pointwise (layout "
          f"{IN * (len(w_shape) - 1) + OUT!r}). If the kernel is an nn.Linear, "
          "name it in linear=; if it is a stack of layers (hk.layer_stack), map it "
          "to a list of torch modules, one per layer.")
    return _reverse_axes(b), a.T.reshape(a.shape[1], r, *([1] * (len(w_shape) - 2)))
  # experts: PEFT's target_parameters keeps lora_A [E·r, in] (rows expert-major)
  # and lora_B [out, r·E] (columns expert-minor).
  if layout.count(STACK) != 1:
    raise ValueError(
        f"Cannot export '{haiku_path}' (kernel {tuple(w_shape)}, layout {layout!r}) to "
        "PEFT: PEFT's target_parameters adapts [experts, in, out] parameters, one "
        "stacked axis. Map a stack of layers to a list of torch modules instead.")
  n = b.shape[0]
  return (b.reshape(n, ins, r).transpose(0, 2, 1).reshape(n * r, ins),
          a.reshape(n, r, outs).transpose(2, 1, 0).reshape(outs, r * n))


def _from_peft(kind: str, w_shape, layout: str, A: np.ndarray, B: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray] | str:
  """PEFT's (A, B) of one (per-layer) kernel -> Haiku (a, b), or what is wrong."""
  w_shape = tuple(w_shape)
  in_shape, out_shape = _sizes(w_shape, layout, IN), _sizes(w_shape, layout, OUT)
  ins, outs = math.prod(in_shape), math.prod(out_shape)
  if kind == "experts":
    n = math.prod(_sizes(w_shape, layout, STACK))
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] % n:
      return f"expected 2-D factors with rows a multiple of {n} experts"
    r = A.shape[0] // n
    want_a, want_b = (n * r, ins), (outs, r * n)
  elif kind == "conv":
    nd = len(w_shape)
    if not _is_conv_layout(layout):
      return (f"a conv adapter needs the window with the input channels (layout "
              f"{IN * (nd - 1) + OUT!r}), not {layout!r}")
    if A.ndim != nd or B.ndim != nd:
      return f"expected {nd}-D conv factors for kernel {w_shape}"
    r = A.shape[0]
    want_a = (r, w_shape[-2]) + w_shape[:-2]
    want_b = (w_shape[-1], r) + (1,) * (nd - 2)
  else:
    if A.ndim != 2 or B.ndim != 2:
      return f"expected 2-D factors for kernel {w_shape}"
    r = A.shape[0]
    rows, cols = ((outs, ins) if kind == "embedding" and layout == OUT + IN
                  else (ins, outs))
    want_a, want_b = (r, rows), (cols, r)
  if A.shape != want_a or B.shape != want_b:
    return (f"expected A {want_a} and B {want_b} (r = {r}) for kernel {w_shape} "
            f"(layout {layout!r}); a grouped conv or a different base model?")
  if kind == "experts":
    stack = _sizes(w_shape, layout, STACK)
    b = A.reshape(n, r, ins).transpose(0, 2, 1).reshape(stack + in_shape + (r,))
    a = B.reshape(outs, r, n).transpose(2, 1, 0).reshape(stack + (r,) + out_shape)
    return a, b
  if kind == "conv":
    return B.reshape(w_shape[-1], r).T, _unreverse_axes(A)
  if kind == "embedding" and layout == OUT + IN:
    return A, B
  return B.T.reshape((r,) + out_shape), A.T.reshape(in_shape + (r,))


def _torch_to_haiku(hpath: str, value: np.ndarray, want, layout: str | None
                    ) -> np.ndarray:
  """A torch weight saved whole -> the Haiku kernel ``want``-shaped."""
  if hpath.rsplit("/", 1)[-1] != "w":
    return value
  if value.ndim != 2:
    return _unreverse_axes(value)
  if len(want) == 2 or layout is None:
    return value.T
  # nn.Linear(prod(in), prod(out)): unflatten the groups, then w's axis order.
  in_shape, out_shape = _sizes(want, layout, IN), _sizes(want, layout, OUT)
  order = [d for d, c in enumerate(layout) if c == IN] + [
      d for d, c in enumerate(layout) if c == OUT]
  if value.T.shape != (math.prod(in_shape), math.prod(out_shape)):
    return value.T
  return np.transpose(value.T.reshape(in_shape + out_shape), np.argsort(order))


def _layer_layout(layout: str | None, layer: int | None) -> str | None:
  """A kernel's layout for one torch module: less the stacked axis of a layer list."""
  if layout is None or layer is None:
    return layout
  return layout[1:] if layout[0] == STACK else None


def _default_layout(kind: str, w_shape) -> str | None:
  """The layout to read a file's factors in, for a plain base kernel."""
  nd = len(w_shape)
  if kind == "experts":
    return STACK + IN + OUT if nd == 3 else None
  if kind == "conv":
    return IN * (nd - 1) + OUT
  return IN + OUT if nd == 2 else None
