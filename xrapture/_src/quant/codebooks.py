"""The code books bitsandbytes quantizes with: NF4 and the signed 8-bit dynamic map.

Values are float32, exactly as bitsandbytes 0.50 holds them: NF4 is the
QLoRA paper's table (``bitsandbytes.functional.get_4bit_type("nf4")``); the
dynamic map is rebuilt here the way ``create_dynamic_map()`` builds it
(``torch.linspace`` in float32, whose CPU kernel rounds ``start + step·i``
once, as a fused multiply-add). Module level holds numpy only: no JAX work at
import.
"""

import functools

import numpy as np

_F32 = np.float32

# 16 quantiles of N(0, 1) scaled to [-1, 1]; code i is the nibble value i.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=_F32)

# A normalized value goes to code i when NF4_BOUNDS[i-1] < value <= NF4_BOUNDS[i]:
# the nearest code, a tie going to the lower one (torch.bucketize, right=False).
NF4_BOUNDS = ((NF4[:-1] + NF4[1:]) / _F32(2)).astype(_F32)

INT8_MAX = 127
# bitsandbytes dequantizes int8 as ``q * absmax * 7.874015718698502e-3`` (1/127).
INT8_INV_MAX = _F32(7.874015718698502e-3)

# The 8-bit quantizer of bitsandbytes' CPU kernel reads the code from a table
# of this many bins over [-1, 1], not from an exact nearest-code search.
_LUT_SIZE = 65536


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=float32)`` on CPU, bit for bit."""
  start32, end32 = _F32(start), _F32(end)
  step = _F32((end32 - start32) / _F32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  # One rounding of an exact float64 value: a float32 fused multiply-add.
  low = (np.float64(start32) + np.float64(step) * i).astype(_F32)
  high = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(_F32)
  return np.where(np.arange(steps) < steps // 2, low, high)


@functools.lru_cache(maxsize=None)
def dynamic_map() -> np.ndarray:
  """The signed 8-bit dynamic map (7 exponent bits): 256 sorted float32 values.

  It quantizes absmax values under double quantization.
  """
  data = []
  for i in range(7):
    bounds = _linspace(0.1, 1.0, 2 ** i + 1)
    means = ((bounds[:-1] + bounds[1:]) / _F32(2)).astype(_F32)
    scale = _F32(10.0 ** (i - 6))
    data.extend(scale * means)
    data.extend(-scale * means)
  data.extend([_F32(0.0), _F32(1.0)])
  code = np.sort(np.array(data, dtype=_F32))
  code.setflags(write=False)
  return code


@functools.lru_cache(maxsize=None)
def dynamic_lut() -> np.ndarray:
  """Code of each of the 65536 bins over [-1, 1] (bitsandbytes' CPU quantizer).

  Bin ``i`` is centred on ``-1 + 2i/65535`` and holds the first code whose
  upper midpoint is not below that centre.
  """
  code = dynamic_map()
  midpoints = (_F32(0.5) * (code[:-1] + code[1:])).astype(_F32)
  i = np.arange(_LUT_SIZE).astype(_F32)
  centres = (_F32(-1.0) + (_F32(2.0) * i) / _F32(_LUT_SIZE - 1)).astype(_F32)
  lut = np.searchsorted(midpoints, centres, side="left").astype(np.uint8)
  lut.setflags(write=False)
  return lut


def dynamic_bin(normed: np.ndarray) -> np.ndarray:
  """LUT bin of values in [-1, 1]: ``trunc((v + 1)·0.5·65535 + 0.5)``, in float32."""
  t = ((normed.astype(_F32) + _F32(1.0)) * _F32(0.5)).astype(_F32)
  t = (t * _F32(_LUT_SIZE - 1)).astype(_F32)
  t = (t + _F32(0.5)).astype(_F32)
  return t.astype(np.int64)
