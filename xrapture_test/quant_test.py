"""Tests for quantize_array, QuantizedArray and dequantize against bitsandbytes.

xrapture/_src/quant/{codebooks,quantize,quantized_array}.py. The reference is
the real bitsandbytes (CPU): the kernel ``w [in, out]`` is its torch weight
``w.T [out, in]``; codes, scales and dequantized values must be bit-equal.
"""


from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import xrapture
from xrapture._src.quant import codebooks
from xrapture._src.quant import quantize
from xrapture._src.quant import quantized_array
from xrapture._src.testing import optional

# The bit-equality tests compare with bitsandbytes; the rest run without it.
torch, bnb = optional.modules("torch", "bitsandbytes.functional")
_TORCH_DTYPES = {} if torch is None else {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _kernel(seed, k, n, dtype="float32"):
  """A heavy-tailed ``[k, n]`` kernel, like trained weights."""
  w = 0.02 * np.random.default_rng(seed).standard_t(3, size=(k, n))
  return jnp.asarray(w, jnp.float32).astype(dtype)


def _to_torch(w):
  """The torch weight ``[out, in]`` of the Haiku kernel ``w [in, out]``."""
  dtype = str(w.dtype)
  return torch.from_numpy(np.asarray(w.astype(jnp.float32)).T.copy()).to(_TORCH_DTYPES[dtype])


def _numpy(t):
  return t.to(torch.float32).numpy() if t.is_floating_point() else t.numpy()


def _bnb_nf4(w, block_size, double_quant):
  packed, state = bnb.quantize_4bit(_to_torch(w), blocksize=block_size, quant_type="nf4",
                                    compress_statistics=double_quant)
  dense = bnb.dequantize_4bit(packed, state)
  return packed, state, jnp.asarray(_numpy(dense).T).astype(w.dtype)


def _from_bnb_state(packed, state, w):
  """A QuantizedArray made of bitsandbytes' own pieces, for a kernel like ``w``."""
  k, n = w.shape
  codes = _numpy(packed).reshape(n, k // 2)
  pieces = {}
  if state.nested:
    pieces = dict(absmax2=jnp.asarray(_numpy(state.state2.absmax)),
                  offset=jnp.asarray(np.float32(state.offset.item())))
  return xrapture.QuantizedArray(
      jnp.asarray(codes), jnp.asarray(_numpy(state.absmax).reshape(n, -1)),
      block_size=state.blocksize, dense_dtype=w.dtype, **pieces)


def _assert_bits_equal(test, ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  test.assertEqual(ours.shape, theirs.shape)
  test.assertEqual(ours.dtype, theirs.dtype)
  np.testing.assert_array_equal(ours.view(f"u{ours.dtype.itemsize}"),
                                theirs.view(f"u{theirs.dtype.itemsize}"))


@absltest.skipIf(torch is None, optional.MISSING)
class CodebookTest(absltest.TestCase):

  def test_nf4_table_is_bitsandbytes(self):
    _assert_bits_equal(self, codebooks.NF4, _numpy(bnb.get_4bit_type("nf4", device="cpu")))

  def test_dynamic_map_is_bitsandbytes(self):
    _assert_bits_equal(self, codebooks.dynamic_map(), _numpy(bnb.create_dynamic_map()))

  def test_dynamic_lut_holds_a_nearest_code(self):
    code = codebooks.dynamic_map().astype(np.float64)
    centres = -1 + 2 * np.arange(65536) / 65535
    picked = code[codebooks.dynamic_lut()]
    nearest = np.abs(code[None, :] - centres[::97, None]).min(axis=1)
    np.testing.assert_allclose(np.abs(picked[::97] - centres[::97]), nearest, atol=1e-7)


_NF4_CASES = [
    dict(testcase_name=f"{k}x{n}_b{b}_{dtype}{'_dq' if dq else ''}",
         k=k, n=n, block_size=b, double_quant=dq, dtype=dtype)
    for (k, n, b, dtype) in [(64, 40, 64, "float32"), (128, 48, 64, "float32"),
                             (256, 40, 128, "float32"), (512, 96, 64, "float32"),
                             (1024, 72, 128, "float32"), (256, 40, 64, "bfloat16"),
                             (128, 24, 32, "float16")]
    for dq in (False, True)
]


@absltest.skipIf(torch is None, optional.MISSING)
class NF4Test(parameterized.TestCase):

  @parameterized.named_parameters(*_NF4_CASES)
  def test_codes_and_absmax_are_bitsandbytes(self, k, n, block_size, double_quant, dtype):
    w = _kernel(k + n, k, n, dtype)
    packed, state, _ = _bnb_nf4(w, block_size, double_quant)
    q = xrapture.quantize_array(w, "nf4", block_size=block_size, double_quant=double_quant)
    self.assertEqual(q.codes.shape, (n, k // 2))
    self.assertEqual(q.absmax.shape, (n, k // block_size))
    _assert_bits_equal(self, np.asarray(q.codes).reshape(-1), _numpy(packed).reshape(-1))
    if not double_quant:
      _assert_bits_equal(self, np.asarray(q.absmax).reshape(-1), _numpy(state.absmax))
      return
    # The offset is a float32 mean; torch sums in a CPU-dependent order.
    offset = np.float32(state.offset.item())
    np.testing.assert_array_max_ulp(np.asarray(q.offset), offset, maxulp=4)
    # From the same offset, every double-quantization piece is bitsandbytes'.
    plain = xrapture.quantize_array(w, "nf4", block_size=block_size)
    codes, absmax2, _ = quantize.double_quantize(np.asarray(plain.absmax), offset)
    _assert_bits_equal(self, codes.reshape(-1), _numpy(state.absmax))
    _assert_bits_equal(self, absmax2, _numpy(state.state2.absmax))

  @parameterized.named_parameters(*_NF4_CASES)
  def test_dequantized_is_bitsandbytes(self, k, n, block_size, double_quant, dtype):
    w = _kernel(k * n, k, n, dtype)
    packed, state, expected = _bnb_nf4(w, block_size, double_quant)
    q = xrapture.quantize_array(w, "nf4", block_size=block_size, double_quant=double_quant)
    if double_quant:  # quantize from bitsandbytes' offset (see the test above)
      plain = xrapture.quantize_array(w, "nf4", block_size=block_size)
      codes, absmax2, offset = quantize.double_quantize(
          np.asarray(plain.absmax), np.float32(state.offset.item()))
      q = q.replace(absmax=jnp.asarray(codes), absmax2=jnp.asarray(absmax2),
                    offset=jnp.asarray(offset))
    dense = jax.jit(xrapture.dequantize)(q)
    self.assertEqual(dense.shape, (k, n))
    _assert_bits_equal(self, dense, expected)
    _assert_bits_equal(self, xrapture.dequantize(q), expected)
    _assert_bits_equal(self, q.materialize(), expected)

  @parameterized.named_parameters(*_NF4_CASES)
  def test_reads_bitsandbytes_state(self, k, n, block_size, double_quant, dtype):
    w = _kernel(k - n, k, n, dtype)
    packed, state, expected = _bnb_nf4(w, block_size, double_quant)
    q = _from_bnb_state(packed, state, w)
    _assert_bits_equal(self, jax.jit(xrapture.dequantize)(q), expected)

  def test_own_offset_stays_within_rounding(self):
    w = _kernel(3, 512, 96)
    _, _, expected = _bnb_nf4(w, 64, True)
    q = xrapture.quantize_array(w, "nf4", double_quant=True)
    np.testing.assert_allclose(xrapture.dequantize(q), expected, rtol=1e-6, atol=1e-9)

  def test_ties_go_to_the_lower_code(self):
    # One block with absmax 1: each value is exactly a midpoint between codes.
    row = np.concatenate([codebooks.NF4_BOUNDS, [1.0], -codebooks.NF4_BOUNDS[::-1]])
    row = np.resize(row, 64).astype(np.float32)
    row[-1] = 1.0
    w = jnp.asarray(np.stack([row, -row], axis=1))  # [64, 2], absmax 1 in both rows
    packed, _, expected = _bnb_nf4(w, 64, False)
    q = xrapture.quantize_array(w, "nf4")
    _assert_bits_equal(self, np.asarray(q.codes).reshape(-1), _numpy(packed).reshape(-1))
    _assert_bits_equal(self, xrapture.dequantize(q), expected)
    # Positive control: a midpoint dequantizes to the code below it.
    nibbles = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], -1).reshape(2, 64)
    np.testing.assert_array_equal(nibbles[0, :15], np.arange(15))

  def test_zero_and_tiny_blocks(self):
    w = np.array(_kernel(5, 256, 8))
    w[:64, 0] = 0.0
    w[64:128, 1] = 1e-39  # subnormal, below bitsandbytes' 1e-38 clamp
    w = jnp.asarray(w)
    packed, state, expected = _bnb_nf4(w, 64, False)
    q = xrapture.quantize_array(w, "nf4")
    _assert_bits_equal(self, np.asarray(q.codes).reshape(-1), _numpy(packed).reshape(-1))
    _assert_bits_equal(self, np.asarray(q.absmax).reshape(-1), _numpy(state.absmax))
    dense, expected = np.array(xrapture.dequantize(q)), np.array(expected)
    # XLA flushes subnormal results to zero; bitsandbytes keeps them.
    np.testing.assert_array_equal(dense[64:128, 1], 0.0)
    self.assertTrue(np.all(np.abs(expected[64:128, 1]) < np.finfo(np.float32).tiny))
    dense[64:128, 1] = expected[64:128, 1] = 0.0
    _assert_bits_equal(self, dense, expected)
    np.testing.assert_array_equal(dense[:64, 0], 0.0)

  def test_embedding_axis_blocks_rows_as_stored(self):
    table = _kernel(9, 50, 128)  # [vocab, dim]: torch's nn.Embedding layout already
    packed, state = bnb.quantize_4bit(torch.from_numpy(np.array(table)), blocksize=64,
                                      quant_type="nf4")
    q = xrapture.quantize_array(table, "nf4", axis=-1)
    self.assertEqual(q.shape, (50, 128))
    _assert_bits_equal(self, np.asarray(q.codes).reshape(-1), _numpy(packed).reshape(-1))
    _assert_bits_equal(self, xrapture.dequantize(q), _numpy(bnb.dequantize_4bit(packed, state)))

  def test_positive_axis_means_the_same_as_negative(self):
    w = _kernel(8, 128, 40)
    for positive, negative in ((0, -2), (1, -1)):
      w = w if negative == -2 else w.T
      q = xrapture.quantize_array(w, "nf4", axis=positive)
      self.assertEqual((q.axis, q.shape), (negative, w.shape))
      np.testing.assert_array_equal(
          xrapture.dequantize(q), xrapture.dequantize(xrapture.quantize_array(w, axis=negative)))

  def test_nibble_halves_interleave_to_the_dequantized_array(self):
    # The products read NF4 kernels as two halves (quant/dot_general.py).
    stack = jnp.stack([_kernel(s, 128, 40) for s in range(2)])
    for axis, w in ((-2, stack), (-1, jnp.swapaxes(stack, -1, -2))):
      for double_quant in (False, True):
        q = xrapture.quantize_array(w, "nf4", axis=axis, double_quant=double_quant)
        hi, lo = (quantized_array.dequantize_half(q, high) for high in (True, False))
        dense = np.asarray(xrapture.dequantize(q))
        blocked = dense.ndim + axis
        _assert_bits_equal(self, hi, np.take(dense, np.arange(0, 128, 2), axis=blocked))
        _assert_bits_equal(self, lo, np.take(dense, np.arange(1, 128, 2), axis=blocked))

  def test_stacked_layers_are_quantized_one_by_one(self):
    stack = jnp.stack([_kernel(s, 128, 40) for s in range(3)])
    q = xrapture.quantize_array(stack, "nf4", double_quant=True)
    self.assertEqual(q.shape, (3, 128, 40))
    for child in (q.codes, q.absmax, q.absmax2, q.offset):
      self.assertEqual(child.shape[0], 3)
    for layer in range(3):
      one = xrapture.quantize_array(stack[layer], "nf4", double_quant=True)
      for ours, alone in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(one)):
        _assert_bits_equal(self, np.asarray(ours)[layer], alone)
      np.testing.assert_array_equal(xrapture.dequantize(q)[layer], xrapture.dequantize(one))

  def test_quantization_error_is_small(self):
    w = _kernel(11, 512, 64)
    absmax = np.abs(np.asarray(w)).T.reshape(64, 8, 64).max(-1)  # [out, blocks]
    half_gap = np.diff(codebooks.NF4).max() / 2  # 0.152, between -1 and -0.696
    for double_quant in (False, True):
      q = xrapture.quantize_array(w, "nf4", double_quant=double_quant)
      error = np.abs(np.asarray(xrapture.dequantize(q)) - np.asarray(w)).T
      scales = np.asarray(quantized_array.block_scales(q))  # absmax as dequantized
      if not double_quant:
        np.testing.assert_array_equal(scales, absmax)
      # |code·scale - s·absmax| <= |code - s|·scale + |scale - absmax| for |s| <= 1.
      bound = half_gap * scales + np.abs(scales - absmax)
      self.assertTrue(np.all(error <= np.repeat(bound, 64, axis=1) * (1 + 1e-6)))
      self.assertGreater(error.max(), 0.5 * half_gap * absmax.min())  # not trivially 0


@absltest.skipIf(torch is None, optional.MISSING)
class Int8Test(parameterized.TestCase):

  @parameterized.parameters("float32", "bfloat16", "float16")
  def test_codes_absmax_and_dequantized_are_bitsandbytes(self, dtype):
    w = np.array(_kernel(21, 96, 64, "float32"))
    w[:, 3] = 0.0  # a zero output channel
    w[:, 5] = np.round(np.random.default_rng(0).normal(size=96)) * 0.5
    w[0, 5] = 63.5  # x·127/63.5 is an integer or half-integer: rounding ties
    w = jnp.asarray(w).astype(dtype)
    codes, stats, _ = bnb.int8_vectorwise_quant(_to_torch(w))
    expected = bnb.int8_vectorwise_dequant(codes, stats)
    q = xrapture.quantize_array(w, "int8")
    self.assertEqual((q.codes.shape, q.absmax.shape, q.block_size), ((64, 96), (64, 1), 96))
    _assert_bits_equal(self, q.codes, _numpy(codes))
    _assert_bits_equal(self, q.absmax[:, 0], _numpy(stats))
    _assert_bits_equal(self, xrapture.dequantize(q),
                       jnp.asarray(_numpy(expected).T).astype(dtype))

  def test_matches_numpy_reference(self):
    w = np.asarray(_kernel(22, 80, 48))
    absmax = np.abs(w).max(axis=0)
    reference = np.round(w / absmax * 127)
    q = xrapture.quantize_array(w, "int8")
    codes = np.asarray(q.codes).T.astype(np.float64)
    self.assertLessEqual(np.abs(codes - reference).max(), 1)  # ties may round apart
    np.testing.assert_allclose(xrapture.dequantize(q), reference * absmax / 127, rtol=1e-6)
    np.testing.assert_allclose(xrapture.dequantize(q), w, atol=absmax.max() / 254 * 1.0001)

  def test_zero_channel_gives_zero_codes(self):
    w = np.array(_kernel(23, 32, 4))
    w[:, 1] = 0.0
    q = xrapture.quantize_array(w, "int8")
    np.testing.assert_array_equal(np.asarray(q.codes)[1], 0)
    np.testing.assert_array_equal(xrapture.dequantize(q)[:, 1], 0.0)


class QuantizedArrayTest(parameterized.TestCase):

  @parameterized.parameters(("nf4", False), ("nf4", True), ("int8", False))
  def test_shape_dtype_and_pytree(self, scheme, double_quant):
    w = _kernel(1, 128, 40, "bfloat16")
    q = xrapture.quantize_array(w, scheme, double_quant=double_quant)
    self.assertEqual((q.shape, q.dtype, q.ndim), ((128, 40), jnp.bfloat16, 2))
    self.assertEqual(q.double_quant, double_quant)
    self.assertTrue(xrapture.is_implicit(q))
    self.assertEqual(xrapture.dequantize(q).dtype, jnp.bfloat16)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    self.assertLen(leaves, 4 if double_quant else 2)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(xrapture.dequantize(again), xrapture.dequantize(q))
    self.assertEqual(xrapture.materialize_nested({"w": q})["w"].shape, (128, 40))

  def test_memory(self):
    w = _kernel(2, 1024, 256)
    nbytes = lambda q: sum(x.nbytes for x in jax.tree_util.tree_leaves(q))
    self.assertEqual(nbytes(xrapture.quantize_array(w, "nf4")), 1024 * 256 // 2 + 4 * 1024 * 4)
    self.assertLess(nbytes(xrapture.quantize_array(w, "nf4", double_quant=True)),
                    nbytes(xrapture.quantize_array(w, "nf4")))
    self.assertEqual(nbytes(xrapture.quantize_array(w, "int8")), 1024 * 256 + 4 * 256)

  def test_pieces_that_disagree_are_refused(self):
    q = xrapture.quantize_array(_kernel(1, 128, 40), "nf4")
    with self.assertRaisesRegex(ValueError, r"absmax must be \(40, 2\)"):
      q.replace(absmax=jnp.zeros((40, 3)))
    with self.assertRaisesRegex(ValueError, "absmax2 and offset come together"):
      q.replace(absmax2=jnp.zeros((1,)))
    with self.assertRaisesRegex(ValueError, r"scheme must be one of \('nf4', 'int8'\)"):
      q.replace(scheme="fp4")


class BadInputTest(parameterized.TestCase):

  def test_unknown_scheme(self):
    with self.assertRaisesRegex(ValueError, r"scheme must be one of \('nf4', 'int8'\), got 'int4'"):
      xrapture.quantize_array(_kernel(0, 64, 8), "int4")

  def test_block_size_not_dividing_the_input_axis(self):
    with self.assertRaisesRegex(
        ValueError, r"block_size 64 does not divide the blocked axis \(axis -2, size 96\) of "
        r"shape \(96, 8\): use one of \[32\]"):
      xrapture.quantize_array(_kernel(0, 96, 8), "nf4")
    with self.assertRaisesRegex(ValueError, "no NF4 block size divides it"):
      xrapture.quantize_array(_kernel(0, 100, 8), "nf4", block_size=32)

  def test_block_size_outside_bitsandbytes_set(self):
    with self.assertRaisesRegex(ValueError,
                                r"block_size must be one of \(32, 64, .*4096\), got 48"):
      xrapture.quantize_array(_kernel(0, 96, 8), "nf4", block_size=48)

  def test_integer_array(self):
    with self.assertRaisesRegex(ValueError, "only floating-point arrays .* dtype int8"):
      xrapture.quantize_array(np.ones((64, 8), np.int8), "int8")

  def test_already_quantized(self):
    q = xrapture.quantize_array(_kernel(0, 64, 8), "nf4")
    with self.assertRaisesRegex(ValueError, "QuantizedArray, which is already implicit"):
      xrapture.quantize_array(q, "nf4")
    lora = xrapture.LoraWeight(jnp.ones((64, 8)), jnp.ones((1, 8)), jnp.ones((64, 1)))
    with self.assertRaisesRegex(ValueError, "LoraWeight, which is already implicit"):
      xrapture.quantize_array(lora, "int8")

  def test_one_dimensional(self):
    with self.assertRaisesRegex(ValueError,
                                r"at least 2 dimensions \[..., M, N\]; got shape \(64,\)"):
      xrapture.quantize_array(np.ones(64, np.float32), "nf4")

  def test_axis(self):
    with self.assertRaisesRegex(ValueError, "axis must be -2 .* or -1; got 0"):
      xrapture.quantize_array(np.ones((2, 64, 64), np.float32), "nf4", axis=0)

  def test_double_quant_with_int8(self):
    with self.assertRaisesRegex(ValueError, "double_quant applies to scheme 'nf4' only"):
      xrapture.quantize_array(_kernel(0, 64, 8), "int8", double_quant=True)

  def test_non_finite(self):
    w = np.array(_kernel(0, 64, 8))
    w[3, 3] = np.nan
    with self.assertRaisesRegex(ValueError, "inf or NaN"):
      xrapture.quantize_array(w, "nf4")


if __name__ == "__main__":
  absltest.main()
