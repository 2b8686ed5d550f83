"""Tests for ragged_dot on per-expert LoraWeights (xrapture/_src/lora/ragged_dot.py)."""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import xrapture
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils

# Experts G, in K, out N, rank R; 7 tokens. All distinct.
G, K, N, R, T = 3, 6, 5, 2, 7
GROUP_SIZES = np.array([2, 0, 5], np.int32)  # an empty group too

check = reference.assert_matches_dense


def _experts(shape=(G, K, N), layout="sio"):
  stack = [shape[d] for d, c in enumerate(layout) if c == "s"]
  ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
  outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
  return xrapture.LoraWeight(
      test_utils.rand(0, *shape, scale=0.3), test_utils.rand(1, *stack, R, *outs, scale=0.5),
      test_utils.rand(2, *stack, *ins, R, scale=0.5), alpha=2.0, layout=layout)


def _loop_reference(x, w, sizes):
  """Each row group times its expert's dense kernel, by hand."""
  out, start = [], 0
  for g, size in enumerate(sizes):
    out.append(x[start:start + size] @ w[g].reshape(w.shape[1], -1))
    start += size
  return np.concatenate(out).reshape((len(x),) + w.shape[2:])


class RaggedDotTest(parameterized.TestCase):

  def test_matches_a_loop_over_experts(self):
    lora, x = _experts(), test_utils.rand(3, T, K)
    out = xrapture.use_implicit_args(lax.ragged_dot)(x, lora, jnp.asarray(GROUP_SIZES))
    np.testing.assert_allclose(
        out, _loop_reference(np.asarray(x), reference.dense_value(lora), GROUP_SIZES),
        rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
      ("ragged_dot", (G, K, N), "sio", (T, K),
       lambda x, w: lax.ragged_dot(x, w, jnp.asarray(GROUP_SIZES))),
      ("multi_axis_out", (G, K, 2, 4), "sioo", (T, K),
       lambda x, w: lax.ragged_dot_general(
           x, w, jnp.asarray(GROUP_SIZES), lax.RaggedDotDimensionNumbers(
               (((1,), (1,)), ((), ())), (0,), (0,)))),
      ("in_axes_after_out", (G, N, K), "soi", (T, K),
       lambda x, w: lax.ragged_dot_general(
           x, w, jnp.asarray(GROUP_SIZES), lax.RaggedDotDimensionNumbers(
               (((1,), (2,)), ((), ())), (0,), (0,)))),
  )
  def test_matches_dense_and_stays_low_rank(self, shape, layout, x_shape, fn):
    # Forward, gradients wrt x, a and b against the dense kernel, and no
    # [K, N]-sized product forward or backward.
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(3, *x_shape), _experts(shape, layout), rtol=1e-4, atol=1e-4)

  def test_no_gradient_for_w(self):
    lora, x = _experts(), test_utils.rand(3, T, K)
    fn = xrapture.use_implicit_args(lax.ragged_dot)
    sizes = jnp.asarray(GROUP_SIZES)
    grads = jax.grad(lambda l: jnp.sum(jnp.sin(fn(x, l, sizes))))(lora)
    np.testing.assert_array_equal(grads.w, np.zeros((G, K, N)))
    # The gradient of an expert that got no tokens is zero, the others not.
    self.assertEqual(float(jnp.abs(grads.b[1]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grads.b[0]).max()), 0.0)
    dense_check.assert_no_dense_product(
        jax.grad(lambda l: jnp.sum(jnp.sin(fn(x, l, sizes)))), lora)

  def test_positive_control(self):
    # Forming the experts' dense kernels is caught.
    lora, x = _experts(), test_utils.rand(3, T, K)
    naive = lambda x, l: lax.ragged_dot(x, l.materialize(), jnp.asarray(GROUP_SIZES))
    with self.assertRaisesRegex(AssertionError, "dense product"):
      dense_check.assert_no_dense_product(naive, x, lora, hlo=False)

  def test_wrong_layout_materializes(self):
    # Adapters spanning the experts (grouped over [G·K, N]) have no per-group form.
    lora = _experts(layout="iio")
    fn = xrapture.use_implicit_args(lax.ragged_dot)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = fn(test_utils.rand(3, T, K), lora, jnp.asarray(GROUP_SIZES))
    messages = [str(w.message) for w in caught
                if issubclass(w.category, xrapture.MaterializationWarning)]
    self.assertLen(messages, 1)
    self.assertIn("ragged_dot", messages[0])
    np.testing.assert_allclose(out, _loop_reference(
        np.asarray(test_utils.rand(3, T, K)), reference.dense_value(lora), GROUP_SIZES),
                               rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
