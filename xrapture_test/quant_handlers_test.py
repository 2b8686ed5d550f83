"""Tests for the primitives run on a QuantizedArray without materializing it.

xrapture/_src/quant/{dot_general,gather,structural}.py. The reference is the
same JAX code on the dequantized dense array; every handled case runs in
strict mode, where any materialization raises.
"""


from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import xrapture
from xrapture._src.testing import dense_check

import test_utils

K, N, L = 128, 40, 3  # dense kernel [K, N] (K blocked), L stacked layers; activations avoid these

SCHEMES = (("nf4", False), ("nf4", True), ("int8", False))


def _quantized(scheme="nf4", double_quant=False, lead=(), shape=(K, N), axis=-2, seed=0):
  w = test_utils.rand(seed, *lead, *shape, scale=0.1)
  return xrapture.quantize_array(w, scheme, double_quant=double_quant, axis=axis)


def _check(test, fn, *args, rtol=1e-5, atol=1e-5):
  """``fn`` on implicit ``args`` (strict mode, eager and jitted) equals ``fn`` on dense ones."""
  dense = xrapture.materialize_nested(args)
  expected = fn(*dense)
  run = xrapture.use_implicit_args(fn)
  with xrapture.strict_mode():
    for got in (run(*args), jax.jit(run)(*args)):
      test.assertEqual(got.shape, expected.shape)
      test.assertEqual(got.dtype, expected.dtype)
      np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


class DotGeneralTest(parameterized.TestCase):

  @parameterized.product(
      scheme=SCHEMES,
      case=[
          ("kernel_on_right", (2, 3, K), (), lambda x, w: x @ w),
          ("kernel_on_left", (N, 6), (), lambda x, w: lax.dot_general(
              w, x, (((1,), (0,)), ((), ())))),
          ("transposed_on_left", (K, 6), (), lambda x, w: w.T @ x),
          ("tied_unembedding", (2, 3, N), (), lambda x, w: x @ w.T),
          ("batch_dims", (L, 6, K), (L,), lambda x, w: jnp.einsum("ltk,lkn->ltn", x, w)),
          ("batch_dims_on_left", (L, N, 6), (L,), lambda x, w: lax.dot_general(
              w, x, (((2,), (1,)), ((0,), (0,))))),
          ("contract_free_axis", (2, N), (), lambda x, w: jnp.einsum("tn,kn->tk", x, w)),
      ])
  def test_matches_dense(self, scheme, case):
    _, x_shape, lead, fn = case
    _check(self, fn, test_utils.rand(1, *x_shape), _quantized(*scheme, lead=lead))

  def test_embedding_layout_on_the_right(self):
    q = _quantized("nf4", True, shape=(N, K), axis=-1)  # blocked along its last axis
    _check(self, lambda x, w: x @ w.T, test_utils.rand(2, 6, K), q)

  def test_mixed_precision(self):
    fn = lambda x, w: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
    _check(self, fn, test_utils.rand(3, 6, K), _quantized("nf4", True), rtol=1e-2, atol=1e-2)

  @parameterized.parameters(*SCHEMES)
  def test_input_gradient_and_no_weight_gradient(self, scheme, double_quant):
    q, x = _quantized(scheme, double_quant), test_utils.rand(5, 6, K)
    loss = lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2)
    implicit = xrapture.use_implicit_args(loss)
    with xrapture.strict_mode():
      gx, gq = jax.jit(jax.grad(implicit, argnums=(0, 1), allow_int=True))(x, q)
    np.testing.assert_allclose(gx, jax.jit(jax.grad(loss))(x, xrapture.dequantize(q)),
                               rtol=1e-5, atol=1e-6)
    for leaf in jax.tree_util.tree_leaves(gq):  # float scales: zero; integer codes: float0
      self.assertTrue(leaf.dtype == jax.dtypes.float0 or not np.any(leaf))
    # The backward pass forms no kernel-sized product (no dW = xᵀ·g).
    self.assertEqual(dense_check.find_dense_products(
        jax.grad(implicit), x, q, shapes=[(K, N)]), [])
    # Positive control: the same search finds the product of a dense kernel's gradient.
    self.assertNotEmpty(dense_check.find_dense_products(
        jax.grad(loss, argnums=1), x, xrapture.dequantize(q), shapes=[(K, N)]))

  def test_backward_keeps_codes_not_the_dense_kernel(self):
    q, x = _quantized("nf4", True), test_utils.rand(6, 6, K)
    fn = lambda x, w: jnp.tanh(x @ w)

    def residuals(f, w):
      # Their shapes and dtypes, traced abstractly (nothing is run).
      vjp = jax.eval_shape(lambda x, w: jax.vjp(lambda x: f(x, w), x)[1], x, w)
      return [(l.shape, l.dtype) for l in jax.tree_util.tree_leaves(vjp)]

    with xrapture.strict_mode():
      kept = residuals(xrapture.use_implicit_args(fn), q)
    self.assertIn((q.codes.shape, q.codes.dtype), kept)
    self.assertFalse([r for r in kept if set(r[0]) >= {K, N}], kept)
    # Positive control: dequantizing outside the product keeps the dense kernel.
    control = residuals(lambda x, q: fn(x, xrapture.dequantize(q)), q)
    self.assertIn(((K, N), jnp.dtype(jnp.float32)), control)

  def test_two_implicit_operands_materialize_with_warning(self):
    q = _quantized()
    out, messages = test_utils.materialization_messages(
        xrapture.use_implicit_args(lambda a, b: a.T @ b), q, q)
    self.assertNotEmpty(messages)
    self.assertIn("QuantizedArray", messages[0])
    dense = xrapture.dequantize(q)
    np.testing.assert_allclose(out, dense.T @ dense, rtol=1e-5, atol=1e-5)


class GatherTest(parameterized.TestCase):

  @parameterized.product(
      scheme=SCHEMES,
      case=[
          ("embed_rows", (N, K), -1, lambda ids, e: e[ids]),
          ("take_clip", (N, K), -1, lambda ids, e: jnp.take(e, ids, axis=0, mode="clip")),
          ("kernel_columns", (K, N), -2, lambda ids, e: e[:, ids]),
      ])
  def test_matches_dense(self, scheme, case):
    _, shape, axis, fn = case
    ids = jnp.array([[0, 5, 39], [7, 7, 1]])
    _check(self, fn, ids, _quantized(*scheme, shape=shape, axis=axis), rtol=0, atol=0)

  def test_haiku_embed(self):
    embed = hk.without_apply_rng(hk.transform(lambda ids: hk.Embed(N, K)(ids)))
    ids = jnp.array([[1, 2, 3], [39, 0, 0]])
    params = jax.jit(embed.init)(jax.random.PRNGKey(0), ids)
    params = jax.tree_util.tree_map(
        lambda e: xrapture.quantize_array(e, "nf4", double_quant=True, axis=-1), params)
    _check(self, embed.apply, params, ids, rtol=0, atol=0)

  def test_dequantizes_only_the_gathered_rows(self):
    q, ids = _quantized("nf4", shape=(N, K), axis=-1), jnp.array([3, 4])
    jaxpr = jax.make_jaxpr(xrapture.use_implicit_args(lambda ids, e: e[ids]))(ids, q)
    shapes = [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]
    self.assertNotIn((N, K), shapes)
    self.assertIn((2, K), shapes)

  def test_blocked_axis_materializes_with_warning(self):
    q = _quantized("nf4", shape=(K, N), axis=-2)  # rows of the kernel run along blocks
    ids = jnp.array([1, 2])
    out, messages = test_utils.materialization_messages(
        xrapture.use_implicit_args(lambda ids, e: e[ids]), ids, q)
    self.assertLen(messages, 1)
    self.assertIn("'gather'", messages[0])
    np.testing.assert_array_equal(out, xrapture.dequantize(q)[ids])


class StructuralTest(parameterized.TestCase):

  @parameterized.product(
      scheme=SCHEMES,
      case=[
          ("static_index", (2, K), lambda x, w: x @ w[1]),
          ("traced_index", (2, K), lambda x, w: x @ w[jnp.argmax(x[0, :L])]),
          ("range", (2, K), lambda x, w: jnp.einsum("tk,lkn->ltn", x, w[1:3])),
          ("strided", (2, K), lambda x, w: jnp.einsum("tk,lkn->ltn", x, w[::2])),
          ("permute_leading", (2, K), lambda x, w: jnp.einsum(
              "tk,alkn->altn", x, jnp.transpose(w, (1, 0, 2, 3)))),
          ("swap_last_two", (2, N), lambda x, w: jnp.einsum(
              "tn,lnk->ltk", x, jnp.swapaxes(w, -1, -2))),
      ])
  def test_matches_dense(self, scheme, case):
    _, x_shape, fn = case
    lead = (2, L) if case[0] == "permute_leading" else (L,)
    _check(self, fn, test_utils.rand(7, *x_shape), _quantized(*scheme, lead=lead))

  def test_cast_keeps_codes(self):
    q = _quantized("nf4", True)
    cast = xrapture.use_implicit_args(lambda w: w.astype(jnp.bfloat16))(q)
    self.assertIsInstance(cast, xrapture.QuantizedArray)
    self.assertEqual(cast.dtype, jnp.bfloat16)
    self.assertIs(cast.codes, q.codes)
    np.testing.assert_array_equal(xrapture.dequantize(cast),
                                  xrapture.dequantize(q).astype(jnp.bfloat16))

  def test_transpose_flips_the_blocked_axis(self):
    q = _quantized("nf4")
    flipped = xrapture.use_implicit_args(lambda w: w.T)(q)
    self.assertEqual((flipped.shape, flipped.axis), ((N, K), -1))
    np.testing.assert_array_equal(xrapture.dequantize(flipped), xrapture.dequantize(q).T)

  def test_unhandled_primitive_materializes_with_warning(self):
    q = _quantized("int8")
    out, messages = test_utils.materialization_messages(
        xrapture.use_implicit_args(lambda w: w + 1.0), q)
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], "QuantizedArray of shape .* 'add'")
    np.testing.assert_array_equal(out, xrapture.dequantize(q) + 1.0)
    with xrapture.strict_mode(), self.assertRaises(xrapture.MaterializationError):
      xrapture.use_implicit_args(lambda w: w + 2.0)(q)


class ScanTest(parameterized.TestCase):

  @parameterized.parameters(*SCHEMES)
  def test_scan_over_stacked_layers(self, scheme, double_quant):
    q, x = _quantized(scheme, double_quant, lead=(L,), shape=(K, K)), test_utils.rand(8, 5, K)

    def net(x, ws):
      return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
    _check(self, net, x, q)
    with xrapture.strict_mode():
      grad = jax.jit(jax.grad(
          lambda x: jnp.sum(xrapture.use_implicit_args(net)(x, q))))(x)
    expected = jax.jit(jax.grad(lambda x: jnp.sum(net(x, xrapture.dequantize(q)))))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    # The scan carries the quantized children as its xs: no [L, K, K] float array.
    jaxpr = jax.make_jaxpr(xrapture.use_implicit_args(net))(x, q)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    self.assertLen(scans, 1)
    xs = [(tuple(v.aval.shape), v.aval.dtype) for v in scans[0].invars]
    self.assertIn((tuple(q.codes.shape), q.codes.dtype), xs)
    self.assertNotIn(((L, K, K), jnp.dtype(jnp.float32)), xs)

  def test_haiku_layer_stack(self):
    def forward(x):
      layer = lambda h: jnp.tanh(hk.Linear(K, with_bias=False)(h))
      return hk.layer_stack(L)(layer)(x)
    model = hk.without_apply_rng(hk.transform(forward))
    x = test_utils.rand(9, 5, K)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(
        lambda w: xrapture.quantize_array(w, "nf4", double_quant=True), params)
    (w,) = jax.tree_util.tree_leaves(params, is_leaf=xrapture.is_implicit)
    self.assertEqual(w.shape, (L, K, K))
    _check(self, model.apply, params, x)


if __name__ == "__main__":
  absltest.main()
