"""Tests for dot_general on LoraWeights (xrapture/_src/lora/dot_general.py)."""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import xrapture
from xrapture._src.lora import dot_general
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils

# Distinct sizes, so that a weight-sized product is unambiguous. Activations
# use 2, 3 and 5, none a multiple of M or N.
M, N, R, L = 48, 40, 4, 5
ALPHA = 2.0


def _lora(seed=0, lead=(), a_lead=None, b_lead=None, alpha=ALPHA):
  a_lead = lead if a_lead is None else a_lead
  b_lead = lead if b_lead is None else b_lead
  return xrapture.LoraWeight(
      test_utils.rand(seed, *lead, M, N, scale=0.2),
      test_utils.rand(seed + 1, *a_lead, R, N, scale=0.5),
      test_utils.rand(seed + 2, *b_lead, M, R, scale=0.5), alpha=alpha)


_dense_np = reference.dense_value
check = reference.assert_matches_dense


def _dg(dimension_numbers, lora_on_lhs=False):
  if lora_on_lhs:
    return lambda x, w: lax.dot_general(w, x, dimension_numbers)
  return lambda x, w: lax.dot_general(x, w, dimension_numbers)


class DotGeneralTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # name, x shape, weight lead, fn
      ("rhs_contract_m", (3, M), (), _dg((((1,), (0,)), ((), ())))),
      ("rhs_contract_m_3d", (2, 3, M), (), _dg((((2,), (0,)), ((), ())))),
      ("rhs_contract_m_x_axis0", (M, 3), (), _dg((((0,), (0,)), ((), ())))),
      ("rhs_contract_m_x_middle", (2, M, 3), (), _dg((((1,), (0,)), ((), ())))),
      ("rhs_contract_n", (3, N), (), _dg((((1,), (1,)), ((), ())))),
      ("rhs_contract_n_3d", (2, N, 3), (), _dg((((1,), (1,)), ((), ())))),
      ("rhs_vector", (M,), (), _dg((((0,), (0,)), ((), ())))),
      ("lhs_contract_n", (N, 3), (), _dg((((1,), (0,)), ((), ())), True)),
      ("lhs_contract_m", (3, M), (), _dg((((0,), (1,)), ((), ())), True)),
      ("lhs_contract_m_3d", (2, M, 3), (), _dg((((0,), (1,)), ((), ())), True)),
      ("lhs_contract_n_vector", (N,), (), _dg((((1,), (0,)), ((), ())), True)),

      ("batch_m_no_contract", (M, 3), (), _dg((((), ()), ((0,), (0,))))),
      ("stacked_batch", (L, 3, M), (L,), _dg((((2,), (1,)), ((0,), (0,))))),
      ("stacked_batch_contract_n", (L, 3, N), (L,),
       _dg((((2,), (2,)), ((0,), (0,))))),
      ("stacked_batch_lhs", (L, 3, M), (L,),
       _dg((((1,), (2,)), ((0,), (0,))), True)),
      ("stacked_batch_x_last", (3, M, L), (L,),
       _dg((((1,), (1,)), ((2,), (0,))))),
      ("stacked_free_lead", (3, M), (L,), _dg((((1,), (1,)), ((), ())))),
      ("stacked_free_lead_lhs", (3, N), (L,), _dg((((2,), (1,)), ((), ())), True)),
      ("stacked_contract_lead_and_m", (L, M, 3), (L,),
       _dg((((0, 1), (0, 1)), ((), ())))),
      ("two_lead_axes", (2, L, 3, M), (2, L),
       _dg((((3,), (2,)), ((0, 1), (0, 1))))),
      ("two_lead_one_batch", (2, 3, M), (2, L),
       _dg((((2,), (2,)), ((0,), (0,))))),
      ("matmul", (3, M), (), lambda x, w: x @ w),
      ("matmul_3d", (2, 3, M), (), lambda x, w: x @ w),
      ("matmul_lhs", (N, 3), (), lambda x, w: w @ x),
      ("matvec", (N,), (), lambda x, w: w @ x),
      ("dot", (3, M), (), jnp.dot),
      ("einsum", (2, 3, M), (), lambda x, w: jnp.einsum("btm,mn->btn", x, w)),
      ("einsum_n", (2, 3, N), (), lambda x, w: jnp.einsum("btn,mn->bmt", x, w)),
      ("tensordot", (2, 3, M), (), lambda x, w: jnp.tensordot(x, w, 1)),
      ("stacked_einsum", (L, 2, M), (L,),
       lambda x, w: jnp.einsum("ltm,lmn->tln", x, w)),
      ("stacked_matmul", (L, 3, M), (L,), lambda x, w: x @ w),
  )
  def test_matches_dense(self, x_shape, lead, fn):
    check(fn, test_utils.rand(7, *x_shape), _lora(lead=lead))

  @parameterized.named_parameters(
      ("same_order", (M, N), (((0, 1), (0, 1)), ((), ()))),
      ("swapped", (N, M), (((0, 1), (1, 0)), ((), ()))),
  )
  def test_contract_both_axes(self, x_shape, dimension_numbers):
    # x is weight-sized here, so its own gradient is too: check a and b only.
    check(_dg(dimension_numbers), test_utils.rand(7, *x_shape),
                        _lora(), grad_x=False)

  @parameterized.named_parameters(
      ("a_broadcast", (1,), (L,)),
      ("b_broadcast", (L,), (1,)),
      ("both_broadcast", (1,), (1,)),
  )
  def test_broadcast_factors(self, a_lead, b_lead):
    lora = _lora(lead=(L,), a_lead=a_lead, b_lead=b_lead)
    check(_dg((((2,), (1,)), ((0,), (0,)))),
                        test_utils.rand(3, L, 3, M), lora)
    check(_dg((((1,), (1,)), ((), ()))), test_utils.rand(4, 3, M), lora)

  def test_no_warnings(self):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w) @ w.T)(
          test_utils.rand(0, 3, M), _lora())

  def test_gradient_wrt_w_is_zero(self):
    lora, x = _lora(), test_utils.rand(1, 2, 3, M)
    f = xrapture.use_implicit_args(lambda x, w: jnp.sin(x @ w))
    loss = lambda lora: jnp.sum(f(x, lora))
    # Run jitted (one compilation), and the very program searched.
    traced = jax.jit(jax.grad(loss)).trace(lora)
    compiled = traced.lower().compile()
    grads = compiled(lora)
    self.assertIsInstance(grads, xrapture.LoraWeight)
    np.testing.assert_array_equal(grads.w, np.zeros((M, N)))
    self.assertGreater(float(jnp.abs(grads.a).max()), 0.0)
    self.assertGreater(float(jnp.abs(grads.b).max()), 0.0)
    # No dense product, even when differentiating wrt the whole LoraWeight.
    dense_check.assert_no_dense_product_in_stages(
        traced, compiled, dense_check.weight_targets(lora))

  def test_general_path_gradient_wrt_w_is_zero(self):
    lora, x = _lora(lead=(L,)), test_utils.rand(1, L, 3, M)
    f = xrapture.use_implicit_args(lambda x, w: jnp.sin(x @ w))
    grads = jax.jit(jax.grad(lambda lora: jnp.sum(f(x, lora))))(lora)
    np.testing.assert_array_equal(grads.w, np.zeros((L, M, N)))

  def test_value_and_grad(self):
    lora, x = _lora(), test_utils.rand(1, 3, M)
    f = xrapture.use_implicit_args(lambda x, w: jnp.sum(jnp.tanh(x @ w)))
    value, (ga, gb) = jax.jit(jax.value_and_grad(
        lambda a, b: f(x, lora.replace(a=a, b=b)), (0, 1)))(lora.a, lora.b)
    # The dense formula, differentiated by hand:
    # d/dW sum(tanh(x W)) = x^T (1 - tanh^2); dW/da = s b^T ·, dW/db = s · a^T.
    w = _dense_np(lora)
    y = np.tanh(np.asarray(x) @ w)
    d_w = np.asarray(x).T @ (1 - y**2)
    s = ALPHA / R
    np.testing.assert_allclose(value, y.sum(), rtol=1e-5)
    np.testing.assert_allclose(ga, s * np.asarray(lora.b).T @ d_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, s * d_w @ np.asarray(lora.a).T, rtol=1e-4, atol=1e-4)

  def test_two_lora_weights_materialize_one(self):
    w1, w2 = _lora(0), _lora(10)
    f = xrapture.use_implicit_args(lambda u, v: u @ v.T)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = f(w1, w2)
    messages = [str(w.message) for w in caught
                if issubclass(w.category, xrapture.MaterializationWarning)]
    self.assertLen(messages, 1)
    self.assertRegex(messages[0], r"LoraWeight.*materialized.*dot_general")
    np.testing.assert_allclose(out, _dense_np(w1) @ _dense_np(w2).T,
                               rtol=1e-4, atol=1e-4)

  def test_precision_is_kept(self):
    lora, x = _lora(), test_utils.rand(1, 3, M)
    fn = lambda x, w: jnp.dot(x, w, precision=lax.Precision.HIGHEST)
    check(fn, x, lora, rtol=1e-5, atol=1e-5)

  def test_bf16_preferred_element_type(self):
    lora, x = _lora(), test_utils.rand(1, 3, M)
    fn = lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                              preferred_element_type=jnp.float32)
    out = xrapture.use_implicit_args(fn)(x, lora)
    self.assertEqual(out.dtype, jnp.float32)
    ref = np.asarray(x) @ _dense_np(lora)
    np.testing.assert_allclose(out, ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max())
    grads = jax.jit(jax.grad(lambda a: jnp.sum(xrapture.use_implicit_args(fn)(
        x, lora.replace(a=a)))))(lora.a)
    self.assertEqual(grads.dtype, jnp.float32)

  @parameterized.parameters(0, 1)
  def test_lora_matmul(self, w_axis):
    k = M if w_axis == 0 else N
    lora, x = _lora(), test_utils.rand(1, 6, k)
    s = lora.get_scale()
    dense = _dense_np(lora) if w_axis == 0 else _dense_np(lora).T
    out = dot_general.lora_matmul(x, lora.w, lora.a, lora.b, w_axis, s, None, None)
    np.testing.assert_allclose(out, np.asarray(x) @ dense, rtol=1e-4, atol=1e-4)
    g = test_utils.rand(2, *out.shape)
    loss = lambda x, w, a, b: jnp.sum(
        dot_general.lora_matmul(x, w, a, b, w_axis, s, None, None) * g)
    dx, dw, da, db = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(x, lora.w, lora.a, lora.b)
    np.testing.assert_array_equal(dw, np.zeros((M, N)))
    x_, g_ = np.asarray(x), np.asarray(g)
    a_, b_ = np.asarray(lora.a), np.asarray(lora.b)
    np.testing.assert_allclose(dx, g_ @ dense.T, rtol=1e-4, atol=1e-4)
    if w_axis == 0:   # y = x w + s (x b) a
      ref_da, ref_db = s * (x_ @ b_).T @ g_, s * x_.T @ (g_ @ a_.T)
    else:             # y = x w^T + s (x a^T) b^T
      ref_da, ref_db = s * (g_ @ b_).T @ x_, s * g_.T @ (x_ @ a_.T)
    np.testing.assert_allclose(da, ref_da, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, ref_db, rtol=1e-4, atol=1e-4)
    dense_check.assert_no_dense_product(
        jax.grad(loss, (0, 2, 3)), x, lora.w, lora.a, lora.b, shapes=[(M, N)])

  def test_vmap_batched_x_unbatched_w(self):
    lora, xs = _lora(), test_utils.rand(1, 3, 2, M)
    f = xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w))
    out = jax.vmap(f, in_axes=(0, None))(xs, lora)
    np.testing.assert_allclose(out, np.tanh(np.asarray(xs) @ _dense_np(lora)),
                               rtol=1e-4, atol=1e-5)

  def test_vmap_batched_w(self):
    lora, x = _lora(lead=(3,)), test_utils.rand(1, 3, 2, M)
    f = xrapture.use_implicit_args(lambda x, w: jnp.tanh(x @ w))
    out = jax.vmap(f)(x, lora)
    np.testing.assert_allclose(out, np.tanh(np.asarray(x) @ _dense_np(lora)),
                               rtol=1e-4, atol=1e-5)
    # Unbatched x, per-example weights; and grads of the vmapped function.
    out = jax.vmap(f, in_axes=(None, 0))(x[0], lora)
    np.testing.assert_allclose(out, np.tanh(np.asarray(x[0]) @ _dense_np(lora)),
                               rtol=1e-4, atol=1e-5)
    loss = lambda a: jnp.sum(jax.vmap(f)(x, lora.replace(a=a)))
    dense_loss = lambda a: jnp.sum(jnp.tanh(x @ (
        lora.w + lora.get_scale() * jnp.matmul(lora.b, a))))
    traced = jax.jit(jax.grad(loss)).trace(lora.a)
    compiled = traced.lower().compile()
    np.testing.assert_allclose(compiled(lora.a), jax.jit(jax.grad(dense_loss))(lora.a),
                               rtol=1e-4, atol=1e-4)
    dense_check.assert_no_dense_product_in_stages(traced, compiled, [(M, N)])

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants(self):
    lora, x = _lora(), test_utils.rand(1, 2, 3, M)
    out = self.variant(xrapture.use_implicit_args(lambda x, w: x @ w))(x, lora)
    np.testing.assert_allclose(out, np.asarray(x) @ _dense_np(lora),
                               rtol=1e-4, atol=1e-4)


def _layout_lora(shape, layout, r=3, seed=0):
  stack = [shape[d] for d, c in enumerate(layout) if c == "s"]
  ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
  outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
  return xrapture.LoraWeight(
      test_utils.rand(seed, *shape, scale=0.2),
      test_utils.rand(seed + 1, *stack, r, *outs, scale=0.5),
      test_utils.rand(seed + 2, *stack, *ins, r, scale=0.5), alpha=ALPHA, layout=layout)


# Axis sizes 6, 4, 5, 7, 8 are distinct; activations use 2 and 3.
_MULTI_AXIS = (
    # name, w shape, layout, x shape, fn(x, w)
    ("query_projection", (6, 4, 5), "ioo", (1, 3, 6),
     lambda x, w: jnp.einsum("btd,dhk->bthk", x, w)),
    ("output_projection", (4, 5, 7), "iio", (2, 3, 4, 5),
     lambda x, w: jnp.einsum("bthk,hkd->btd", x, w)),
    ("output_projection_lhs", (4, 5, 7), "iio", (2, 4, 5),
     lambda x, w: lax.dot_general(w, x, (((0, 1), (1, 2)), ((), ())))),
    ("contract_out_group", (6, 4, 5), "ioo", (3, 4, 5),
     lambda x, w: jnp.einsum("thk,dhk->td", x, w)),
    ("contract_in_group_swapped_pairs", (4, 5, 7), "iio", (3, 5, 4),
     lambda x, w: lax.dot_general(x, w, (((2, 1), (0, 1)), ((), ())))),
    ("interleaved_groups", (4, 6, 5), "ioi", (3, 4, 5),
     lambda x, w: jnp.einsum("thk,hdk->td", x, w)),
    ("contract_part_of_in_group", (4, 5, 7), "iio", (3, 4),
     lambda x, w: jnp.einsum("th,hkd->tkd", x, w)),
    ("contract_across_groups", (4, 6, 5), "ioo", (3, 4, 5),
     lambda x, w: jnp.einsum("thk,hdk->td", x, w)),
    ("head_batch_dims", (4, 6, 5), "sio", (4, 3, 6),
     lambda x, w: jnp.einsum("htd,hdk->htk", x, w)),
    # Mixture-of-experts: per-expert kernels [E, in, out] through batch dims.
    ("experts_einsum", (4, 6, 7), "sio", (4, 3, 6),
     lambda x, w: jnp.einsum("ecd,edf->ecf", x, w)),
    ("experts_multi_axis_out", (4, 6, 2, 5), "sioo", (4, 3, 6),
     lambda x, w: jnp.einsum("ecd,edhk->echk", x, w)),
    ("stacked_experts", (2, 4, 6, 7), "ssio", (2, 4, 3, 6),
     lambda x, w: jnp.einsum("lecd,ledf->lecf", x, w)),
    ("experts_mixed_over", (4, 6, 7), "iio", (3, 4, 6),
     lambda x, w: jnp.einsum("ted,edf->tf", x, w)),
)


class MultiAxisTest(parameterized.TestCase):

  @parameterized.named_parameters(*_MULTI_AXIS)
  def test_matches_dense(self, shape, layout, x_shape, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, *x_shape), _layout_lora(shape, layout))

  @parameterized.named_parameters(
      ("query", (6, 4, 5), "ioo", (2, 3, 6), "btd,dhk->bthk"),
      ("output", (4, 5, 7), "iio", (2, 3, 4, 5), "bthk,hkd->btd"),
  )
  def test_fast_path_runs_lora_matmul(self, shape, layout, x_shape, spec):
    lora = _layout_lora(shape, layout)
    fn = xrapture.use_implicit_args(lambda x, w: jnp.einsum(spec, x, w))
    self.assertIn("custom_vjp_call", str(jax.make_jaxpr(fn)(test_utils.rand(1, *x_shape), lora)))

  def test_dense_positive_control_is_caught(self):
    # The checker sees a multi-axis ΔW formed by hand, in any axis order.
    lora = _layout_lora((6, 4, 5), "ioo")
    naive = lambda x, w: jnp.einsum("btd,dhk->bthk", x, w.materialize())
    with self.assertRaisesRegex(AssertionError, "dense product"):
      dense_check.assert_no_dense_product(naive, test_utils.rand(1, 2, 3, 6), lora)
    grad_w = jax.grad(lambda w, x: jnp.sum(jnp.einsum("btd,dhk->bthk", x, w) ** 2))
    with self.assertRaisesRegex(AssertionError, "dense product"):
      dense_check.assert_no_dense_product(
          grad_w, lora.w, test_utils.rand(1, 2, 3, 6), shapes=[lora.shape])


if __name__ == "__main__":
  absltest.main()
