"""Tests for conv_general_dilated on LoraWeights (xrapture/_src/lora/conv.py)."""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import xrapture
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils

# The kernel's channel axes are M (in for HWIO, out for HWOI) and N.
M, N, R = 48, 40, 4
ALPHA = 2.0

check = reference.assert_matches_dense


def _conv_lora(window, pointwise, seed=0):
  """A kernel ``[*window, M, N]`` whose ``pointwise`` factor spans no window."""
  one = (1,) * len(window)
  a_lead, b_lead = (one, window) if pointwise == "a" else (window, one)
  return xrapture.LoraWeight(
      test_utils.rand(seed, *window, M, N, scale=0.1),
      test_utils.rand(seed + 1, *a_lead, R, N, scale=0.5),
      test_utils.rand(seed + 2, *b_lead, M, R, scale=0.5), alpha=ALPHA)


def _conv(dimension_numbers, **kwargs):
  return lambda x, w: lax.conv_general_dilated(
      x, w, dimension_numbers=dimension_numbers, **kwargs)


def _haiku(module, **kwargs):
  """``fn(x, w)`` applying a Haiku conv module with kernel ``w``."""
  transformed = hk.without_apply_rng(hk.transform(
      lambda x: module(with_bias=False, name="conv", **kwargs)(x)))
  return lambda x, w: transformed.apply({"conv": {"w": w}}, x)


_CASES = (
    # name, x shape, window, fn
    ("conv1d_same", (2, 9, M), (3,),
     _conv(("NWC", "WIO", "NWC"), window_strides=(1,), padding="SAME")),
    ("conv1d_stride_dilation", (2, 11, M), (3,),
     _conv(("NWC", "WIO", "NWC"), window_strides=(2,), padding=((2, 1),),
           rhs_dilation=(2,))),
    ("conv2d_stride_padding_dilation", (2, 7, 9, M), (3, 2),
     _conv(("NHWC", "HWIO", "NHWC"), window_strides=(2, 1),
           padding=((1, 0), (2, 2)), rhs_dilation=(1, 2))),
    ("conv2d_nchw_valid", (2, M, 7, 9), (3, 2),
     _conv(("NCHW", "HWIO", "NCHW"), window_strides=(1, 1), padding="VALID")),
    ("conv2d_transposed_hwoi", (2, 5, 6, N), (3, 2),
     _conv(("NHWC", "HWOI", "NHWC"), window_strides=(1, 1),
           padding=((2, 2), (1, 1)), lhs_dilation=(2, 2))),
    ("conv2d_hwoi", (2, 5, 7, N), (3, 2),
     _conv(("NHWC", "HWOI", "NHWC"), window_strides=(1, 1), padding="SAME")),
    ("conv_transpose_api", (2, 5, 7, M), (3, 3),
     lambda x, w: lax.conv_transpose(x, w, (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    ("hk_conv1d", (2, 9, M), (3,),
     _haiku(hk.Conv1D, output_channels=N, kernel_shape=3)),
    ("hk_conv2d_strided", (2, 7, 9, M), (3, 2),
     _haiku(hk.Conv2D, output_channels=N, kernel_shape=(3, 2), stride=2)),
    ("hk_conv2d_transpose", (2, 5, 7, N), (3, 2),
     _haiku(hk.Conv2DTranspose, output_channels=M, kernel_shape=(3, 2), stride=2)),
)


class ConvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      *[(name + "_a_pointwise", x, window, fn, "a") for name, x, window, fn in _CASES],
      *[(name + "_b_pointwise", x, window, fn, "b") for name, x, window, fn in _CASES])
  def test_matches_dense(self, x_shape, window, fn, pointwise):
    lora = _conv_lora(window, pointwise)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, *x_shape), lora, rtol=1e-4, atol=1e-4)

  def _materializes(self, fn, x, lora):
    implicit = xrapture.use_implicit_args(fn)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = implicit(x, lora)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, xrapture.MaterializationWarning)]
    self.assertNotEmpty(messages)
    self.assertIn("materialized", messages[0])
    self.assertIn("conv_general_dilated", messages[0])
    self.assertIn("LoraWeight", messages[0])
    np.testing.assert_allclose(out, fn(x, reference.dense_value(lora)),
                               rtol=1e-4, atol=1e-4)
    with xrapture.strict_mode():
      with self.assertRaises(xrapture.MaterializationError):
        implicit(x, lora)
    return implicit

  def test_grouped_conv_materializes_with_warning(self):
    lora, x = _conv_lora((3,), "a"), test_utils.rand(1, 2, 9, 2 * M)
    fn = _conv(("NWC", "WIO", "NWC"), window_strides=(1,), padding="SAME",
               feature_group_count=2)
    implicit = self._materializes(fn, x, lora)
    # The checker sees the dense kernel.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      self.assertNotEmpty(dense_check.find_dense_products(implicit, x, lora))

  def test_depthwise_conv_materializes_with_warning(self):
    lora = xrapture.LoraWeight(test_utils.rand(0, 3, 1, N), test_utils.rand(1, 1, R, N),
                               test_utils.rand(2, 3, 1, R))
    fn = _conv(("NWC", "WIO", "NWC"), window_strides=(1,), padding="SAME",
               feature_group_count=N)
    self._materializes(fn, test_utils.rand(3, 2, 9, N), lora)

  def test_no_pointwise_factor_materializes_with_warning(self):
    # Both factors span the window: the update is not a conv times a matmul.
    lora = xrapture.LoraWeight(test_utils.rand(0, 3, M, N), test_utils.rand(1, 3, R, N),
                               test_utils.rand(2, 3, M, R))
    fn = _conv(("NWC", "WIO", "NWC"), window_strides=(1,), padding="SAME")
    self._materializes(fn, test_utils.rand(3, 2, 9, M), lora)

  def test_gradient_wrt_w_is_zero(self):
    lora, x = _conv_lora((3, 2), "b"), test_utils.rand(1, 2, 7, 9, M)
    fn = xrapture.use_implicit_args(
        _conv(("NHWC", "HWIO", "NHWC"), window_strides=(1, 1), padding="SAME"))
    grads = jax.jit(jax.grad(lambda lora: jnp.sum(jnp.sin(fn(x, lora)))))(lora)
    np.testing.assert_array_equal(grads.w, np.zeros(lora.shape))


def _layout_lora(shape, layout, r=3, seed=0):
  stack = [shape[d] for d, c in enumerate(layout) if c == "s"]
  ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
  outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
  return xrapture.LoraWeight(
      test_utils.rand(seed, *shape, scale=0.1),
      test_utils.rand(seed + 1, *stack, r, *outs, scale=0.5),
      test_utils.rand(seed + 2, *stack, *ins, r, scale=0.5), alpha=ALPHA, layout=layout)


# The layout adapt derives for a conv: window and input features 'i', output
# features 'o'; so the grouped matrix is [prod(window)·in, out]. Channels 6
# (in) and 5 (out), windows 3, 2, 4: all distinct.
_GROUPED = (
    # name, kernel shape, layout, x shape, fn
    ("conv1d_wio", (3, 6, 5), "iio", (2, 9, 6),
     _conv(("NWC", "WIO", "NWC"), window_strides=(2,), padding="SAME")),
    ("conv2d_hwio", (3, 2, 6, 5), "iiio", (2, 7, 9, 6),
     _conv(("NHWC", "HWIO", "NHWC"), window_strides=(1, 2), padding=((1, 0), (2, 2)),
           rhs_dilation=(2, 1))),
    ("conv2d_hwoi_transpose", (3, 2, 5, 6), "iioi", (2, 7, 9, 6),
     _conv(("NHWC", "HWOI", "NHWC"), window_strides=(1, 1), padding=((2, 2), (1, 1)),
           lhs_dilation=(2, 2))),
    ("conv2d_oihw", (5, 6, 3, 2), "oiii", (2, 6, 7, 9),
     _conv(("NCHW", "OIHW", "NCHW"), window_strides=(1, 1), padding="VALID")),
    ("conv3d_dhwio", (3, 2, 4, 6, 5), "iiiio", (1, 5, 7, 9, 6),
     _conv(("NDHWC", "DHWIO", "NDHWC"), window_strides=(1, 2, 1), padding="SAME")),
    ("hk_conv3d", (3, 2, 4, 6, 5), "iiiio", (1, 5, 7, 9, 6),
     _haiku(hk.Conv3D, output_channels=5, kernel_shape=(3, 2, 4))),
    ("hk_conv2d_transpose", (3, 2, 5, 6), "iioi", (2, 4, 7, 6),
     _haiku(hk.Conv2DTranspose, output_channels=5, kernel_shape=(3, 2), stride=2)),
    # The window with the output features: pointwise first, then a conv.
    ("window_with_out_features", (3, 2, 6, 5), "ooio", (2, 7, 9, 6),
     _conv(("NHWC", "HWIO", "NHWC"), window_strides=(2, 1), padding="SAME")),
)


class GroupedConvLayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(*_GROUPED)
  def test_matches_dense(self, shape, layout, x_shape, fn):
    lora = _layout_lora(shape, layout)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, *x_shape), lora, rtol=1e-4, atol=1e-4)

  def test_rank_above_in_channels(self):
    # ResNet's stem: 3 input channels, yet rank 8 is fine on [7·7·3, 64].
    lora = _layout_lora((7, 7, 3, 16), "iiio", r=8)
    self.assertEqual(lora.grouped_shape, (147, 16))
    fn = _conv(("NHWC", "HWIO", "NHWC"), window_strides=(2, 2), padding="SAME")
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, 2, 10, 10, 3), lora, rtol=1e-4, atol=1e-4)

  def test_window_split_across_groups_materializes(self):
    lora = _layout_lora((3, 2, 6, 5), "oiio")
    fn = _conv(("NHWC", "HWIO", "NHWC"), window_strides=(1, 1), padding="SAME")
    self._materializes_once(fn, test_utils.rand(3, 2, 7, 9, 6), lora)

  def _materializes_once(self, fn, x, lora):
    implicit = xrapture.use_implicit_args(fn)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = implicit(x, lora)
    self.assertLen([w for w in caught
                    if issubclass(w.category, xrapture.MaterializationWarning)], 1)
    np.testing.assert_allclose(out, fn(x, reference.dense_value(lora)),
                               rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
  absltest.main()
