"""quantize_array: NF4 or int8 codes of a float kernel, computed as bitsandbytes does.

Runs in numpy at load time (the array is brought to the host once); each rule
below is bitsandbytes 0.50's CPU path, float32 rounding for float32 rounding:

* NF4 (``quantize_4bit``): per block ``absmax = max|x|``; ``x · (1/absmax)``
  (the reciprocal of ``max(absmax, 1e-38)``), clipped to [-1, 1]; the nearest
  NF4 code, a tie going to the lower code; two codes per byte, the first in
  the high nibble.
* double quantization (``compress_statistics=True``): ``offset`` is the mean
  of the absmax values (summed in float64; torch sums float32 in an order
  that depends on the CPU, so its mean can differ by an ulp or two); ``absmax
  - offset`` is quantized in blocks of 256 with the 8-bit dynamic map, each
  value ``v · (1/absmax2)`` going to its bin of a 65536-bin table (the CPU
  kernel's rule, which now and then picks the second-nearest code).
* int8 (``int8_vectorwise_quant``): per output channel ``absmax = max|x|``;
  ``round_half_even(x · ((1/absmax) · 127))``; a zero row gets zero codes.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xrapture._src.implicit import implicit_array
from xrapture._src.quant import codebooks
from xrapture._src.quant import quantized_array

QuantizedArray = quantized_array.QuantizedArray
SCHEMES = quantized_array.SCHEMES
DOUBLE_QUANT_BLOCK = quantized_array.DOUBLE_QUANT_BLOCK
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit blocks

_F32 = np.float32


def quantize_array(x: Any, scheme: str = "nf4", *, block_size: int = 64,
                   double_quant: bool = False, axis: int = -2) -> QuantizedArray:
  """Quantizes a frozen float array (a kernel) to NF4 or int8.

  Blocks run along ``axis``: the kernel's input axis, ``-2`` for a Haiku
  kernel ``[..., in, out]`` (which bitsandbytes sees as the torch weight
  ``[out, in]``), ``-1`` for an embedding table ``[..., vocab, dim]``. Axes
  before the last two are stacked layers, each quantized on its own.

  Examples:
    >>> import numpy as np, xrapture
    >>> w = np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(64, 3)
    >>> q = xrapture.quantize_array(w, "nf4", block_size=64)
    >>> q.shape, q.codes.shape, q.absmax.shape
    ((64, 3), (3, 32), (3, 1))
    >>> float(np.abs(xrapture.dequantize(q) - w).max()) < 0.16
    True

  Args:
    x: a floating-point array ``[..., M, N]`` (numpy or JAX).
    scheme: ``"nf4"`` (4-bit NormalFloat in blocks) or ``"int8"`` (one
      symmetric absmax per output channel).
    block_size: NF4 values per absmax, one of 32, 64, ..., 4096 dividing the
      size of ``axis``. Ignored by int8.
    double_quant: NF4 only: quantize the absmax values too (bitsandbytes'
      ``compress_statistics``), saving 0.37 bits per parameter at block 64.
    axis: ``-2`` or ``-1``: the blocked (input) axis.

  Returns:
    A :class:`xrapture.QuantizedArray` of ``x``'s shape and dtype.

  Raises:
    ValueError: for an unknown ``scheme``, a bad ``block_size`` or ``axis``,
      ``double_quant`` with int8, an integer, non-finite, already quantized
      or lower than 2-D array.
  """
  dtype = _check(x, scheme, block_size, double_quant, axis)
  axis -= len(np.shape(x)) if axis >= 0 else 0
  rows = np.asarray(jax.device_get(x)).astype(_F32)
  if axis == -2:
    rows = np.swapaxes(rows, -1, -2)
  if not np.isfinite(rows).all():
    raise ValueError("quantize_array: the array holds inf or NaN values; only finite "
                     "weights can be quantized.")
  if scheme == "int8":
    codes, absmax = _int8(rows)
    block_size = rows.shape[-1]
  else:
    codes, absmax = _nf4(rows, block_size)
  absmax2 = offset = None
  if double_quant:
    absmax, absmax2, offset = double_quantize(absmax)
  return QuantizedArray(codes, absmax, absmax2, offset, scheme=scheme,
                        block_size=block_size, axis=axis, dense_dtype=dtype)


def _check(x, scheme, block_size, double_quant, axis) -> np.dtype:
  if implicit_array.is_implicit(x):
    raise ValueError(f"quantize_array: got a {type(x).__name__}, which is already "
                     "implicit; quantize the dense kernel (materialize it first).")
  if scheme not in SCHEMES:
    raise ValueError(f"quantize_array: scheme must be one of {SCHEMES}, got {scheme!r}.")
  shape = tuple(np.shape(x))
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"quantize_array: only floating-point arrays can be quantized; got "
                     f"dtype {dtype} (shape {shape}).")
  if len(shape) < 2:
    raise ValueError(f"quantize_array: the array must have at least 2 dimensions "
                     f"[..., M, N]; got shape {shape}.")
  if axis not in (-2, -1, len(shape) - 2, len(shape) - 1):
    raise ValueError(f"quantize_array: axis must be -2 (a kernel's input axis) or -1; "
                     f"got {axis}.")
  if double_quant and scheme != "nf4":
    raise ValueError(f"quantize_array: double_quant applies to scheme 'nf4' only; got "
                     f"scheme {scheme!r}.")
  if scheme == "nf4":
    size = shape[axis]
    if block_size not in BLOCK_SIZES:
      raise ValueError(f"quantize_array: block_size must be one of {BLOCK_SIZES}, got "
                       f"{block_size!r}.")
    if size % block_size:
      fits = [b for b in BLOCK_SIZES if size % b == 0]
      hint = f"use one of {fits}" if fits else "no NF4 block size divides it"
      raise ValueError(
          f"quantize_array: block_size {block_size} does not divide the blocked axis "
          f"(axis {axis}, size {size}) of shape {shape}: {hint}, or leave this "
          "array unquantized.")
  return dtype


def _nf4(rows: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Packed codes ``[..., R, K/2]`` and absmax ``[..., R, K/block]`` of float32 rows."""
  blocks = rows.reshape(*rows.shape[:-1], rows.shape[-1] // block_size, block_size)
  absmax = np.abs(blocks).max(axis=-1)
  inverse = (_F32(1.0) / np.maximum(absmax, _F32(1e-38))).astype(_F32)
  scaled = np.clip(blocks * inverse[..., None], _F32(-1.0), _F32(1.0))
  codes = np.searchsorted(codebooks.NF4_BOUNDS, scaled, side="left").astype(np.uint8)
  codes = codes.reshape(rows.shape)
  packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
  return packed.astype(np.uint8), absmax.astype(_F32)


def _int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """int8 codes ``[..., R, K]`` and absmax ``[..., R, 1]`` of float32 rows."""
  absmax = np.abs(rows).max(axis=-1, keepdims=True)
  with np.errstate(divide="ignore"):
    scale = ((_F32(1.0) / absmax).astype(_F32) * _F32(codebooks.INT8_MAX)).astype(_F32)
  scale = np.where(absmax == 0, _F32(0.0), scale)
  codes = np.rint(rows * scale).astype(np.int8)
  return codes, absmax.astype(_F32)


def double_quantize(absmax: np.ndarray, offset: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """8-bit codes of ``absmax - offset`` per 256 values, per leading slice.

  Args:
    absmax: float32 ``[..., R, blocks]``.
    offset: float32 ``[...]``; the mean of each slice's absmax if None.

  Returns:
    ``(codes uint8 [..., R, blocks], absmax2 float32 [..., ceil(R·blocks/256)],
    offset float32 [...])``.
  """
  lead = absmax.shape[:-2]
  flat = absmax.reshape(*lead, -1).astype(_F32)
  n = flat.shape[-1]
  if offset is None:
    offset = (flat.astype(np.float64).sum(axis=-1) / n).astype(_F32)
  offset = np.asarray(offset, _F32)
  count = -(-n // DOUBLE_QUANT_BLOCK)
  padded = np.zeros(lead + (count * DOUBLE_QUANT_BLOCK,), _F32)
  padded[..., :n] = (flat - offset[..., None]).astype(_F32)
  blocks = padded.reshape(*lead, count, DOUBLE_QUANT_BLOCK)
  absmax2 = np.abs(blocks).max(axis=-1)
  with np.errstate(divide="ignore"):
    inverse = (_F32(1.0) / absmax2).astype(_F32)
  normed = np.clip(blocks * np.where(absmax2 == 0, _F32(0.0), inverse)[..., None],
                   _F32(-1.0), _F32(1.0))
  codes = codebooks.dynamic_lut()[codebooks.dynamic_bin(normed)]
  codes = np.where(absmax2[..., None] == 0, np.uint8(0), codes)
  codes = codes.reshape(*lead, count * DOUBLE_QUANT_BLOCK)[..., :n]
  return codes.reshape(absmax.shape), absmax2.astype(_F32), offset
