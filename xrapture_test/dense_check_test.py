"""Tests for the no-dense-product checker (xrapture/_src/testing/dense_check.py)."""

import doctest

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax import lax
import xrapture
from xrapture._src.testing import dense_check

import test_utils

M, N, R, L = 48, 40, 4, 5


def _naive_dense(x, w, b, a):
  """The positive control: forms ``w + b @ a``, then multiplies."""
  return x @ (w + b @ a)


def _low_rank(x, w, b, a):
  """The same function without forming ``b @ a``."""
  return x @ w + (x @ b) @ a


class DenseCheckTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.x = test_utils.rand(0, 3, M)
    self.w = test_utils.rand(1, M, N)
    self.b = test_utils.rand(2, M, R)
    self.a = test_utils.rand(3, R, N)
    self.args = (self.x, self.w, self.b, self.a)

  def test_positive_control_caught_in_jaxpr(self):
    found = dense_check.find_dense_products(_naive_dense, *self.args,
                                            shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertIn("dot_general", found[0])
    self.assertIn("[48,40]", found[0])

  def test_positive_control_caught_in_hlo(self):
    found = dense_check.find_dense_products_in_hlo(_naive_dense, *self.args,
                                                   shapes=[(M, N)])
    self.assertNotEmpty(found)
    self.assertIn("f32[48,40]", found[0])
    self.assertIn("dot(", found[0])
    self.assertNotIn("metadata", found[0])

  def test_transposed_orientation_caught(self):
    found = dense_check.find_dense_products(
        lambda x, b, a: x @ (a.T @ b.T), test_utils.rand(0, 3, N), self.b, self.a,
        shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertIn("[40,48]", found[0])

  def test_low_rank_passes(self):
    self.assertEmpty(dense_check.find_dense_products(
        _low_rank, *self.args, shapes=[(M, N)]))
    self.assertEmpty(dense_check.find_dense_products_in_hlo(
        _low_rank, *self.args, shapes=[(M, N)]))
    dense_check.assert_no_dense_product(_low_rank, *self.args, shapes=[(M, N)])

  def test_dense_weight_gradient_caught(self):
    # Differentiating wrt w forms the W-sized gradient x^T @ g.
    grad = jax.grad(lambda w, x: jnp.sum(jnp.sin(x @ w)))
    found = dense_check.find_dense_products(grad, self.w, self.x, shapes=[(M, N)])
    self.assertNotEmpty(found)
    self.assertNotEmpty(dense_check.find_dense_products_in_hlo(
        grad, self.w, self.x, shapes=[(M, N)]))

  def test_assert_lists_offenders(self):
    with self.assertRaisesRegex(AssertionError, r"dense product") as ctx:
      dense_check.assert_no_dense_product(_naive_dense, *self.args,
                                          shapes=[(M, N)])
    message = str(ctx.exception)
    self.assertIn("jaxpr: dot_general", message)
    self.assertIn("hlo: ", message)
    self.assertIn("(48, 40)", message)

  def test_in_stages_checks_the_traced_and_compiled_program(self):
    traced = jax.jit(_naive_dense).trace(*self.args)
    compiled = traced.lower().compile()
    with self.assertRaisesRegex(AssertionError, r"dense product") as ctx:
      dense_check.assert_no_dense_product_in_stages(traced, compiled, [(M, N)])
    self.assertIn("jaxpr: dot_general", str(ctx.exception))
    self.assertIn("hlo: ", str(ctx.exception))
    with self.assertRaisesRegex(AssertionError, r"1 dense product"):
      dense_check.assert_no_dense_product_in_stages(traced, None, [(M, N)])
    low = jax.jit(_low_rank).trace(*self.args)
    dense_check.assert_no_dense_product_in_stages(
        low, low.lower().compile(), [(M, N)])

  def test_jaxpr_only(self):
    with self.assertRaisesRegex(AssertionError, r"1 dense product"):
      dense_check.assert_no_dense_product(_naive_dense, *self.args,
                                          shapes=[(M, N)], hlo=False)

  @parameterized.named_parameters(
      ("jit", lambda f: jax.jit(f)),
      ("remat", lambda f: jax.checkpoint(f)),
      ("nested_jit_in_remat", lambda f: jax.checkpoint(jax.jit(f))),
      ("cond", lambda f: lambda *args: lax.cond(
          True, f, lambda *a: jnp.zeros((3, N)), *args)),
      ("custom_jvp", lambda f: _with_custom_jvp(f)),
      ("custom_vjp", lambda f: _with_custom_vjp(f)),
  )
  def test_recurses_into_sub_jaxprs(self, wrap):
    found = dense_check.find_dense_products(wrap(_naive_dense), *self.args,
                                            shapes=[(M, N)])
    self.assertLen(found, 1, msg=found)
    self.assertIn("/dot_general", found[0])

  def test_recurses_into_scan_and_while(self):
    def scanned(x, w, b, a):
      def body(h, wba):
        w_, b_, a_ = wba
        return jnp.tanh(h @ (w_ + b_ @ a_)) @ w_.T, None
      return lax.scan(body, x, (w, b, a))[0]
    stacked = (self.x, test_utils.rand(1, L, M, N), test_utils.rand(2, L, M, R),
                       test_utils.rand(3, L, R, N))
    found = dense_check.find_dense_products(scanned, *stacked, shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertTrue(found[0].startswith("scan[jaxpr]/"), found[0])

    def looped(x, w, b, a):
      return lax.fori_loop(0, 3, lambda i, h: h @ (w + b @ a) @ w.T, x)
    # fori_loop with static bounds becomes a scan; a traced bound a while.
    found = dense_check.find_dense_products(looped, *self.args, shapes=[(M, N)])
    self.assertLen(found, 1)

    def while_loop(x, w, b, a):
      return lax.while_loop(lambda h: jnp.sum(h) < 0.0,
                            lambda h: h @ (w + b @ a) @ w.T, x)
    found = dense_check.find_dense_products(while_loop, *self.args,
                                            shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertTrue(found[0].startswith("while[body_jaxpr]/"), found[0])

  def test_conv_kernel_gradient_caught(self):
    # Inputs are arguments: closed-over constants would be folded away by XLA.
    args = (test_utils.rand(2, 3, M, N), test_utils.rand(0, 2, 5, M), test_utils.rand(1, 2, 5, N))
    grad = jax.grad(lambda k, x, g: jnp.sum(lax.conv_general_dilated(
        x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")) * g))
    found = dense_check.find_dense_products(grad, *args, shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertIn("conv_general_dilated", found[0])
    found = dense_check.find_dense_products_in_hlo(grad, *args, shapes=[(M, N)])
    self.assertLen(found, 1)
    self.assertIn("convolution(", found[0])

  def test_shapes_default_to_implicit_arguments(self):
    lora = xrapture.LoraWeight(self.w, self.a, self.b)
    self.assertEqual(dense_check.weight_shapes({"w": lora, "x": self.x}),
                     [(M, N)])
    materialize_first = lambda x, w: x @ w.materialize()
    found = dense_check.find_dense_products(materialize_first, self.x, lora)
    self.assertLen(found, 1)
    self.assertEmpty(dense_check.find_dense_products(
        xrapture.use_implicit_args(lambda x, w: x @ w), self.x, lora))

  def test_no_shapes_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "no weight shapes"):
      dense_check.find_dense_products(_low_rank, *self.args)

  def test_flattened_stack_in_hlo(self):
    # XLA may merge a stacked [L, M, N] product into [L*M, N].
    stack = lambda b, a: jnp.einsum("lmr,rn->lmn", b, a)
    b, a = test_utils.rand(0, L, M, R), test_utils.rand(1, R, N)
    self.assertNotEmpty(dense_check.find_dense_products(stack, b, a,
                                                        shapes=[(M, N)]))
    self.assertNotEmpty(dense_check.find_dense_products_in_hlo(
        stack, b, a, shapes=[(M, N)], flattened=True))

  @parameterized.named_parameters(
      ("merged_rows", "  %dot = f32[240,40]{1,0} dot(%b, %a)", 0, 1),
      ("merged_columns", "  %dot = f32[40,240]{1,0} dot(%a, %b)", 0, 1),
      ("activation", "  %dot = f32[6,40]{1,0} dot(%x, %w)", 0, 0),
  )
  def test_hlo_text_flattened(self, line, strict, flattened):
    self.assertLen(dense_check.find_dense_products_in_hlo_text(line, [(M, N)]),
                   strict)
    self.assertLen(dense_check.find_dense_products_in_hlo_text(
        line, [(M, N)], flattened=True), flattened)

  @parameterized.named_parameters(
      ("dot", "  %dot.1 = f32[48,40]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}", 1),
      ("dot_transposed", "  ROOT %d = bf16[2,40,48]{2,1,0} dot(%p0, %p1)", 1),
      ("convolution", "  %c = f32[3,48,40]{2,1,0} convolution(%x, %g)", 1),
      ("convolution_interleaved", "  %c = f32[48,3,40]{2,1,0} convolution(%x, %g)", 1),
      ("dot_interleaved", "  %d = f32[48,3,40]{2,1,0} dot(%x, %g)", 0),
      ("custom_call_matmul",
       '  %m = (f32[48,40]{1,0}, u8[16]{0}) custom-call(%a, %b), '
       'custom_call_target="__onednn$matmul"', 1),
      ("custom_call_other",
       '  %m = f32[48,40]{1,0} custom-call(%a), custom_call_target="Sharding"', 0),
      ("add", "  %add = f32[48,40]{1,0} add(%p0, %p1)", 0),
      ("activation", "  %dot.2 = f32[6,40]{1,0} dot(%p0, %p1)", 0),
      ("other_shape", "  %dot.3 = f32[48,41]{1,0} dot(%p0, %p1)", 0),
  )
  def test_hlo_text(self, line, expected):
    found = dense_check.find_dense_products_in_hlo_text(line, [(M, N)])
    self.assertLen(found, expected)

  def test_shapes_of_a_multi_axis_lora_weight(self):
    lora = xrapture.LoraWeight(test_utils.rand(0, 6, 4, 5), test_utils.rand(1, 2, 4, 5),
                               test_utils.rand(2, 6, 2),
                               layout="ioo")
    self.assertEqual(dense_check.weight_shapes(lora), [(6, 20)])
    # ΔW in w's own axes, in another order, or as the grouped matrix: caught.
    for naive in (lambda l: l.materialize(),
                  lambda l: jnp.einsum("dr,rhk->khd", l.b, l.a),
                  lambda l: l.b @ l.a.reshape(2, 20)):
      self.assertNotEmpty(dense_check.find_dense_products(naive, lora))
    self.assertEmpty(dense_check.find_dense_products(
        xrapture.use_implicit_args(lambda x, w: jnp.einsum("td,dhk->thk", x, w)),
        test_utils.rand(3, 3, 6), lora))

  @parameterized.named_parameters(
      # Conv3D with 3 input channels and k=3: activations hold 3s and 5s.
      ("conv3d_three_channels", (3, 3, 3, 3, 5), "iiiio", (2, 3, 3, 3, 3),
       ("NDHWC", "DHWIO", "NDHWC")),
      # A ResNet block: batch 8 and 8 channels in and out.
      ("resnet_batch_equals_channels", (3, 3, 8, 8), "iiio", (8, 6, 6, 8),
       ("NHWC", "HWIO", "NHWC")),
  )
  def test_conv_activations_are_not_kernels(self, shape, layout, x_shape, dn):
    r = 2
    lora = xrapture.LoraWeight(test_utils.rand(0, *shape), test_utils.rand(1, r, shape[-1]),
                               test_utils.rand(2, *shape[:-1], r), layout=layout)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1,) * (len(shape) - 2), "SAME", dimension_numbers=dn)
    fn = xrapture.use_implicit_args(conv)
    x = test_utils.rand(3, *x_shape)
    loss = lambda x, l: jnp.sum(jnp.sin(fn(x, l)))
    # The kernel's own shapes: no report, forward or backward ...
    dense_check.assert_no_dense_product(fn, x, lora)
    dense_check.assert_no_dense_product(jax.grad(loss, (0, 1)), x, lora)
    # ... while "M and N anywhere in a convolution" (a user-given (M, N))
    # fires on the activations.
    m, n = shape[-2:]
    self.assertNotEmpty(dense_check.find_dense_products_in_hlo(
        fn, x, lora, shapes=[(m, n)]))
    # Positive control: the dense kernel's gradient is caught.
    grad_w = jax.grad(lambda w, x: jnp.sum(jnp.sin(conv(x, w))))
    with self.assertRaisesRegex(AssertionError, "dense product"):
      dense_check.assert_no_dense_product(grad_w, lora.w, x, shapes=[shape])

  def test_doctest(self):
    result = doctest.testmod(dense_check, verbose=False)
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)


def _with_custom_jvp(f):
  g = jax.custom_jvp(f)
  g.defjvp(lambda primals, tangents: (g(*primals), jnp.zeros((3, N))))
  return g


def _with_custom_vjp(f):
  g = jax.custom_vjp(f)
  g.defvjp(lambda *args: (f(*args), args),
           lambda args, ct: tuple(jnp.zeros_like(a) for a in args))
  return g


if __name__ == "__main__":
  absltest.main()
