"""QuantizedArray: a frozen kernel held as NF4 or int8 codes, and its dequantization.

The layout is bitsandbytes': the kernel seen as a torch weight ``[out, in]``
(the Haiku kernel ``[in, out]`` transposed), codes running along ``in`` in
blocks with one float32 absmax each. Dequantization is pure JAX and equals
``bitsandbytes.functional.dequantize_4bit`` (NF4) and
``int8_vectorwise_dequant`` (int8) bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.quant import codebooks

SCHEMES = ("nf4", "int8")
DOUBLE_QUANT_BLOCK = 256  # bitsandbytes' block for quantizing the absmax values


class QuantizedArray(implicit_array.ImplicitArray):
  """A dense ``[..., M, N]`` array stored quantized along one of its last two axes.

  ``axis`` names the dense axis whose consecutive values share an absmax (the
  kernel's input axis: ``-2`` for a Haiku kernel ``[in, out]``, ``-1`` for an
  embedding table ``[vocab, dim]``). Children hold that axis last, so with
  ``K`` its size and ``R`` the other one:

  * ``codes``: NF4: uint8 ``[..., R, K/2]``, two codes per byte, the first in
    the high nibble; int8: int8 ``[..., R, K]``.
  * ``absmax``: float32 ``[..., R, K/block_size]`` (int8: ``block_size = K``,
    one absmax per output channel). With double quantization, uint8 codes of
    ``absmax - offset`` in the 8-bit dynamic map instead.
  * ``absmax2`` (double quantization only): float32 ``[..., ceil(R·K/block_size/256)]``,
    the absmax of each 256 consecutive entries of the flattened ``absmax``.
  * ``offset`` (double quantization only): float32 ``[...]``, the mean absmax.

  Leading axes (stacked layers) are quantized one slice at a time, so every
  child has them in front and ``lax.scan`` can slice them. Build one with
  :func:`xrapture.quantize_array`; :meth:`materialize` is
  :func:`xrapture.dequantize`. Handlers stop the gradient of every child:
  the quantized array is frozen.

  Attributes:
    codes: the quantized values.
    absmax: the block scales, or their 8-bit codes under double quantization.
    absmax2: the scales of ``absmax`` under double quantization, else None.
    offset: the mean subtracted from ``absmax`` before double quantization, else None.
    scheme: static; ``"nf4"`` or ``"int8"``.
    block_size: static; values per absmax along ``axis``.
    axis: static; ``-2`` or ``-1``, the blocked axis of the dense array.
    dense_dtype: static; the dtype :meth:`materialize` returns.
  """

  # numpy arrays as quantize_array builds them, jax.Arrays once on a device.
  codes: jax.Array | np.ndarray
  absmax: jax.Array | np.ndarray
  absmax2: jax.Array | np.ndarray | None = None
  offset: jax.Array | np.ndarray | None = None
  scheme: str = implicit_array.aux_field(default="nf4")
  block_size: int = implicit_array.aux_field(default=64)
  axis: int = implicit_array.aux_field(default=-2)
  dense_dtype: np.dtype = implicit_array.aux_field(default=np.dtype(np.float32))

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"QuantizedArray: scheme must be one of {SCHEMES}, got {self.scheme!r}.")
    if self.axis not in (-2, -1):
      raise ValueError(f"QuantizedArray: axis must be -2 or -1, got {self.axis!r}.")
    self.dense_dtype = np.dtype(self.dense_dtype)
    codes, absmax = (getattr(x, "shape", None) for x in (self.codes, self.absmax))
    if codes is None or absmax is None:
      return
    codes, absmax = tuple(codes), tuple(absmax)
    expected = codes[:-1] + (self._k() // self.block_size,)
    problem = None
    if len(codes) < 2:
      problem = "codes need at least 2 dimensions"
    elif absmax != expected:
      problem = f"absmax must be {expected} (codes[:-1] + (K / block_size,))"
    elif (self.absmax2 is None) != (self.offset is None):
      problem = "absmax2 and offset come together (double quantization) or not at all"
    elif self.absmax2 is not None and self.offset is not None:  # both, by the check above
      blocks = -(-int(np.prod(absmax[-2:])) // DOUBLE_QUANT_BLOCK)
      if tuple(self.absmax2.shape) != codes[:-2] + (blocks,):
        problem = f"absmax2 must be {codes[:-2] + (blocks,)}"
      elif tuple(self.offset.shape) != codes[:-2]:
        problem = f"offset must be {codes[:-2]}"
    if problem:
      raise ValueError(f"QuantizedArray pieces disagree: codes {codes}, absmax {absmax}: "
                       f"{problem}.")

  def _k(self) -> int:
    packed = self.codes.shape[-1]
    return 2 * packed if self.scheme == "nf4" else packed

  @property
  def shape(self) -> tuple[int, ...]:
    lead, rows, k = tuple(self.codes.shape[:-2]), self.codes.shape[-2], self._k()
    return (*lead, k, rows) if self.axis == -2 else (*lead, rows, k)

  @property
  def dtype(self) -> np.dtype:
    return self.dense_dtype

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  def materialize(self) -> jax.Array:
    """The dequantized array (see :func:`dequantize`)."""
    return dequantize(self)

  def replace(self, **changes) -> "QuantizedArray":
    """A validated copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)


def block_scales(q: QuantizedArray) -> jax.Array | np.ndarray:
  """float32 ``[..., R, K/block_size]``: the absmax of every block.

  Under double quantization this is bitsandbytes' ``dequantize_blockwise``
  of the absmax codes plus the offset, in that order of float32 roundings.
  """
  absmax = lax.stop_gradient(q.absmax)
  if q.absmax2 is None or q.offset is None:  # not double-quantized (they come together)
    return absmax
  lead, n = absmax.shape[:-2], absmax.shape[-2] * absmax.shape[-1]
  absmax2 = lax.stop_gradient(q.absmax2)
  blocks = absmax2.shape[-1]
  flat = absmax.reshape(*lead, n)
  flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, blocks * DOUBLE_QUANT_BLOCK - n)])
  values = jnp.asarray(codebooks.dynamic_map())[flat]
  values = values.reshape(*lead, blocks, DOUBLE_QUANT_BLOCK) * absmax2[..., None]
  values = values.reshape(*lead, blocks * DOUBLE_QUANT_BLOCK)[..., :n]
  # bitsandbytes rounds the product, then the sum. XLA contracts a multiply
  # feeding an add into one fused multiply-add (one rounding), and removes
  # barriers first; adding a zero it cannot fold (offset·0) makes the product's
  # own add the contraction target, so the sum below is rounded on its own.
  offset = lax.stop_gradient(q.offset)[..., None]
  values = (values + offset * 0) + offset
  return values.reshape(absmax.shape)


def _nf4_half_rows(codes: jax.Array | np.ndarray, scales: jax.Array | np.ndarray,
                   high: bool) -> jax.Array:
  """float32 ``[..., R, K/2]``: the NF4 values of the high (or low) nibbles of ``codes``.

  Each code's table value times its block's absmax (float32), the rule
  bitsandbytes dequantizes by; the high nibbles are the even positions of
  the blocked axis, the low ones the odd positions.
  """
  codes = jnp.asarray(codes)
  blocks = scales.shape[-1]
  grouped = codes.reshape(*codes.shape[:-1], blocks, codes.shape[-1] // blocks)
  nibbles = grouped >> 4 if high else grouped & 0xF
  values = jnp.asarray(codebooks.NF4)[nibbles] * scales[..., None]
  return values.reshape(codes.shape)


def dequantize_rows(codes: jax.Array | np.ndarray, scales: jax.Array | np.ndarray, scheme: str,
                    dtype: np.dtype) -> jax.Array:
  """Dense ``[..., R, K]`` from codes ``[..., R, K/2 | K]`` and scales ``[..., R, blocks]``."""
  if scheme == "nf4":
    halves = [_nf4_half_rows(codes, scales, high) for high in (True, False)]
    values = jnp.stack(halves, axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
  else:
    values = jnp.asarray(codes).astype(jnp.float32) * scales
    values = values * codebooks.INT8_INV_MAX
  return values.astype(dtype)


def dequantize_half(q: QuantizedArray, high: bool) -> jax.Array:
  """NF4: the dense values of the high (``high``) or of the low nibbles alone.

  ``dequantize(q)`` interleaves the two along the blocked axis: its values at
  even positions of that axis are the high half, at odd positions the low
  half, each ``q.shape`` with the blocked axis halved and bit-equal to those
  values. A product can take them apart (the other operand's even and odd
  slices), which spares XLA the interleaving of a whole kernel.
  """
  if q.scheme != "nf4":
    raise ValueError(f"dequantize_half needs an NF4 array, not {q.scheme!r}.")
  values = _nf4_half_rows(q.codes, block_scales(q), high).astype(q.dtype)
  return jnp.swapaxes(values, -1, -2) if q.axis == -2 else values


def dequantize(q: QuantizedArray) -> jax.Array:
  """The dense array ``q`` stands for, in ``q.dtype`` (jit-able, no gradient).

  Bit-equal to bitsandbytes: NF4 codes times the block absmax in float32, then
  cast; int8 codes times the row absmax times ``1/127`` in float32, then cast.

  Args:
    q: the quantized array.

  Returns:
    An array of ``q.shape`` and ``q.dtype``.
  """
  dense = dequantize_rows(q.codes, block_scales(q), q.scheme, q.dtype)
  return jnp.swapaxes(dense, -1, -2) if q.axis == -2 else dense
