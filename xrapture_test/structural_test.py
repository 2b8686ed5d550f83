"""Tests for transposes, casts, indexing and scaling of LoraWeights.

xrapture/_src/lora/structural.py: each returns a LoraWeight, so the matmul
that follows stays low-rank.
"""

import warnings

from absl.testing import absltest
from absl.testing import parameterized
import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax
import jmp
import numpy as np
import xrapture
from xrapture._src.testing import dense_check
from xrapture._src.testing import reference

import test_utils

M, N, R, L = 48, 40, 4, 5

check = reference.assert_matches_dense
dense_value = reference.dense_value


def _lora(seed=0, lead=(), a_lead=None, b_lead=None):
  a_lead = lead if a_lead is None else a_lead
  b_lead = lead if b_lead is None else b_lead
  return xrapture.LoraWeight(
      test_utils.rand(seed, *lead, M, N, scale=0.2),
      test_utils.rand(seed + 1, *a_lead, R, N, scale=0.5),
      test_utils.rand(seed + 2, *b_lead, M, R, scale=0.5), alpha=2.0)


class TransposeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("tied_unembedding", (2, 3, N), (), lambda x, w: x @ w.T),
      ("transposed_on_left", (M, 3), (), lambda x, w: w.T @ x),
      ("tied_embed_and_unembed", (3, M), (),
       lambda x, w: jnp.tanh(x @ w) @ w.T),
      ("swapaxes_stacked", (L, 3, N), (),
       lambda x, w: x @ jnp.swapaxes(w, -1, -2)),
      ("permute_leading", (L, 2, 3, M), (2, L),
       lambda x, w: x @ jnp.transpose(w, (1, 0, 2, 3))),
      ("permute_leading_and_core", (L, 2, 3, N), (2, L),
       lambda x, w: x @ jnp.transpose(w, (1, 0, 3, 2))),
  )
  def test_matches_dense(self, x_shape, lead, fn):
    lora = _lora(lead=lead)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, *x_shape), lora)

  def test_returns_lora_weight(self):
    # 0.1.0 swapped the factors (a' = bᵀ, b' = aᵀ); now the layout is permuted
    # and the factors are kept as they are.
    lora = _lora()
    out = xrapture.use_implicit_args(lambda w: w.T)(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.shape, (N, M))
    self.assertEqual(out.layout, "oi")
    np.testing.assert_array_equal(out.a, lora.a)
    np.testing.assert_array_equal(out.b, lora.b)
    np.testing.assert_allclose(dense_value(out), dense_value(lora).T, rtol=1e-6)

  def test_core_axis_moved_to_front(self):
    # 0.1.0 materialized this; the layout now follows the axis.
    lora = _lora(lead=(L,))
    out = xrapture.use_implicit_args(lambda w: jnp.transpose(w, (1, 0, 2)))(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.layout, "iso")
    np.testing.assert_allclose(dense_value(out), np.transpose(dense_value(lora), (1, 0, 2)),
                               rtol=1e-5, atol=1e-6)


class ConvertElementTypeTest(parameterized.TestCase):

  def test_bf16_matmul(self):
    lora, x = _lora(), test_utils.rand(7, 2, 3, M)
    fn = lambda x, w: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
    # bf16 keeps 8 bits: compare loosely, against a dense bf16 reference.
    out = check(fn, x, lora, rtol=5e-2, atol=5e-2)
    self.assertEqual(out.dtype, jnp.bfloat16)

  def test_cast_returns_lora_weight(self):
    out = xrapture.use_implicit_args(lambda w: w.astype(jnp.bfloat16))(_lora())
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertEqual({out.w.dtype, out.a.dtype, out.b.dtype},
                     {np.dtype(jnp.bfloat16)})

  def test_haiku_mixed_precision(self):
    policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")

    def forward(x):
      hk.mixed_precision.set_policy(hk.Linear, policy)
      try:
        return hk.Linear(N, with_bias=False, name="linear")(x)
      finally:
        hk.mixed_precision.clear_policy(hk.Linear)

    transformed = hk.without_apply_rng(hk.transform(forward))
    fn = lambda x, w: transformed.apply({"linear": {"w": w}}, x)
    out = check(fn, test_utils.rand(7, 3, M), _lora(), rtol=5e-2, atol=5e-2)
    self.assertEqual(out.dtype, jnp.float32)

  def test_integer_cast_materializes(self):
    lora = _lora()
    fn = xrapture.use_implicit_args(lambda w: w.astype(jnp.int32))
    out, messages = test_utils.materialization_messages(fn, lora)
    self.assertEqual(out.dtype, jnp.int32)
    self.assertLen(messages, 1)
    self.assertIn("convert_element_type", messages[0])


class IndexingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("static_index", (L,), lambda x, w: x @ w[1]),
      ("negative_index", (L,), lambda x, w: x @ w[-1]),
      ("static_slice", (L,), lambda x, w: x @ w[1:3]),
      ("strided_slice", (L,), lambda x, w: x @ w[::2]),
      ("two_leading_axes", (2, L), lambda x, w: x @ w[1, 3]),
      ("dynamic_index_constant", (L,), lambda x, w: x @ w[jnp.asarray(3)]),
  )
  def test_matches_dense(self, lead, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, 3, M), _lora(lead=lead))

  @parameterized.parameters(0, 2, L - 1)
  def test_traced_index(self, index):
    lora, x = _lora(lead=(L,)), test_utils.rand(7, 3, M)
    fn = lambda inputs, w: inputs[0] @ w[inputs[1]]
    jaxpr = jax.make_jaxpr(xrapture.use_implicit_args(fn))((x, 0), lora)
    self.assertIn("dynamic_slice", str(jaxpr))
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, (x, jnp.int32(index)), lora, grad_x=False)

  @parameterized.named_parameters(
      ("a_broadcast", (1,), (L,)),
      ("b_broadcast", (L,), (1,)),
  )
  def test_broadcast_factor(self, a_lead, b_lead):
    lora = _lora(lead=(L,), a_lead=a_lead, b_lead=b_lead)
    x = test_utils.rand(7, 3, M)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(lambda x, w: x @ w[2], x, lora)
      check(lambda x, w: x @ w[1:4], x, lora)
      check(lambda x, w: x @ w[x.shape[0]], x, lora)

  def test_index_returns_lora_weight(self):
    lora = _lora(lead=(L,))
    out = xrapture.use_implicit_args(lambda w: w[3])(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    np.testing.assert_allclose(dense_value(out), dense_value(lora)[3], rtol=1e-6)

  def test_squeeze(self):
    lora = _lora(lead=(1,))
    out = xrapture.use_implicit_args(lambda w: jnp.squeeze(w, 0))(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.shape, (M, N))

  def test_slicing_the_core(self):
    # 0.1.0 materialized this; now rows of w and b are cut, a is kept.
    lora = _lora()
    out = xrapture.use_implicit_args(lambda w: w[1:3])(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    np.testing.assert_array_equal(out.b, lora.b[1:3])
    np.testing.assert_array_equal(out.a, lora.a)
    np.testing.assert_allclose(dense_value(out), dense_value(lora)[1:3], rtol=1e-5,
                               atol=1e-6)

  def test_stack_of_lora_weights(self):
    # 0.1.0 materialized jnp.stack([W, W]); now it adds a stacked axis.
    lora = _lora()
    out = xrapture.use_implicit_args(lambda w: jnp.stack([w, 2.0 * w]))(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.layout, "sio")
    np.testing.assert_allclose(dense_value(out), np.stack(
        [dense_value(lora), 2.0 * dense_value(lora)]), rtol=1e-5, atol=1e-6)


class ScalarTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("mul_left", lambda x, w: x @ (2.5 * w)),
      ("mul_right", lambda x, w: x @ (w * 2.5)),
      ("div", lambda x, w: x @ (w / 4.0)),
      ("neg", lambda x, w: x @ (-w)),
      ("mul_then_transpose", lambda x, w: x @ (0.5 * w).T.T),
      ("constant_array_scalar", lambda x, w: x @ (w * np.float32(0.3))),
  )
  def test_matches_dense(self, fn):
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, test_utils.rand(7, 3, M), _lora())

  def test_traced_scalar_materializes_and_keeps_its_gradient(self):
    # w gets no gradient inside a LoraWeight, so a traced (maybe trained)
    # scalar folded into it would lose the w part of its own gradient.
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = lambda c, x, w: x @ (w * c)
    implicit = xrapture.use_implicit_args(fn)
    loss = lambda c: jnp.sum(jnp.sin(implicit(c, x, lora)))
    grad, messages = test_utils.materialization_messages(jax.jit(jax.grad(loss)), 1.5)
    self.assertNotEmpty(messages)
    self.assertIn("'mul'", messages[0])
    dense = jnp.asarray(dense_value(lora))
    expected = jax.jit(jax.grad(lambda c: jnp.sum(jnp.sin(fn(c, x, dense)))))(1.5)
    np.testing.assert_allclose(grad, expected, rtol=1e-4)

  def test_returns_lora_weight(self):
    lora = _lora()
    out = xrapture.use_implicit_args(lambda w: -(w * 3.0) / 2.0)(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    np.testing.assert_allclose(dense_value(out), -1.5 * dense_value(lora),
                               rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(
      ("mul_by_vector", lambda w: w * jnp.ones((N,)), "mul"),
      ("add", lambda w: w + 1.0, "add"),
      ("scalar_over_weight", lambda w: 1.0 / w, "div"),
      ("weight_times_weight", lambda w: w * w, "mul"),
  )
  def test_other_elementwise_materializes(self, fn, primitive):
    lora = _lora()
    out, messages = test_utils.materialization_messages(xrapture.use_implicit_args(fn), lora)
    self.assertNotEmpty(messages)
    self.assertIn(f"'{primitive}'", messages[0])
    self.assertIn("LoraWeight", messages[0])
    # rtol: 1 / w is large where w is near zero.
    np.testing.assert_allclose(out, fn(jnp.asarray(dense_value(lora))),
                               rtol=1e-3, atol=1e-5)


class CopyTest(absltest.TestCase):

  def test_copy_keeps_lora_weight(self):
    lora, x = _lora(), test_utils.rand(7, 3, M)
    fn = lambda x, w: x @ jnp.copy(w)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, x, lora)
    self.assertEqual(dense_check.find_dense_products(
        xrapture.use_implicit_args(fn), x, lora), [])


class OptimizationBarrierTest(absltest.TestCase):

  def test_barrier_between_weight_and_matmul_matches_dense(self):
    def fn(x, w):
      x, w = lax.optimization_barrier((x, w))
      return jnp.tanh(x @ w)

    lora, x = _lora(), test_utils.rand(7, 3, M)
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(fn, x, lora)
    self.assertEqual(dense_check.find_dense_products(
        xrapture.use_implicit_args(fn), x, lora), [])

  def test_barrier_returns_lora_weights_and_holds_their_factors(self):
    lora, other, x = _lora(), _lora(seed=10, lead=(L,)), test_utils.rand(7, 3, M)
    fn = xrapture.use_implicit_args(lambda *ops: lax.optimization_barrier(ops))
    out = fn(x, lora, other)
    self.assertLen(out, 3)
    np.testing.assert_array_equal(out[0], x)
    for got, want in zip(out[1:], (lora, other)):
      self.assertIsInstance(got, xrapture.LoraWeight)
      self.assertEqual((got.alpha, got.rslora), (want.alpha, want.rslora))
      for name in ("w", "a", "b"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    (eqn,) = [e for e in jax.make_jaxpr(fn)(x, lora, other).jaxpr.eqns
              if e.primitive.name == "optimization_barrier"]
    # x, then w, a, b of each LoraWeight: the factors pass the barrier.
    self.assertEqual([tuple(v.aval.shape) for v in eqn.invars],
                     [x.shape, lora.w.shape, lora.a.shape, lora.b.shape,
                      other.w.shape, other.a.shape, other.b.shape])


def _layout_lora(shape, layout, r=2, seed=0):
  """A LoraWeight of ``shape`` and ``layout`` with random factors."""
  stack = [shape[d] for d, c in enumerate(layout) if c == "s"]
  ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
  outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
  return xrapture.LoraWeight(
      test_utils.rand(seed, *shape, scale=0.2),
      test_utils.rand(seed + 1, *stack, r, *outs, scale=0.5),
      test_utils.rand(seed + 2, *stack, *ins, r, scale=0.5), alpha=2.0, layout=layout)


# Sizes 6, 3, 5, 7, 4 are distinct; activations use 2 and 9.
_OPS = (
    # name, w shape, layout, x shape, op on w, fn(x, w) using it
    ("transpose_within_out_group", (6, 3, 5), "ioo", (2, 6),
     lambda w: jnp.transpose(w, (0, 2, 1)),
     lambda x, w: jnp.einsum("bi,idh->bhd", x, w)),
    ("transpose_across_groups", (6, 3, 5), "ioo", (2, 6),
     lambda w: jnp.transpose(w, (2, 0, 1)),
     lambda x, w: jnp.einsum("bi,dih->bhd", x, w)),
    ("slice_out_axis", (6, 7), "io", (2, 6), lambda w: w[:, 1:5],
     lambda x, w: x @ w),
    ("strided_slice_out_axis", (6, 3, 5), "ioo", (2, 6), lambda w: w[:, ::2, 1:],
     lambda x, w: jnp.einsum("bi,ihd->bhd", x, w)),
    ("slice_in_axis", (6, 7), "io", (2, 4), lambda w: w[2:6], lambda x, w: x @ w),
    ("slice_stacked_axis", (4, 6, 7), "sio", (2, 9, 6), lambda w: w[1:3],
     lambda x, w: jnp.einsum("sbi,sio->sbo", x, w)),
    ("dynamic_index_out_axis", (6, 3, 5), "ioo", (2, 6),
     lambda w: lax.dynamic_index_in_dim(w, jnp.int32(2), axis=1, keepdims=False),
     lambda x, w: x @ w),
    ("split_out_axis_gru", (6, 7), "io", (2, 6),
     lambda w: jnp.split(w, [4], axis=1),
     lambda x, ws: jnp.concatenate([jnp.tanh(x @ ws[0]), x @ ws[1]], -1)),
    ("split_in_axis", (6, 7), "io", (2, 2),
     lambda w: jnp.split(w, [2, 4], axis=0),
     lambda x, ws: sum(x @ v for v in ws)),
    ("concatenate_out_axis", (6, 7), "io", (2, 6),
     lambda w: jnp.concatenate([w, 2.0 * w[:, :3]], axis=1), lambda x, w: x @ w),
    ("concatenate_in_axis", (6, 7), "io", (2, 10),
     lambda w: jnp.concatenate([w[:4], -w], axis=0), lambda x, w: x @ w),
    ("concatenate_stacked_axis", (4, 6, 7), "sio", (6, 9, 6),
     lambda w: jnp.concatenate([w, w[:2]], axis=0),
     lambda x, w: jnp.einsum("sbi,sio->sbo", x, w)),
    ("reshape_merges_out_axes", (6, 3, 5), "ioo", (2, 6),
     lambda w: w.reshape(6, 15), lambda x, w: x @ w),
    ("reshape_merges_in_axes", (3, 5, 7), "iio", (2, 15),
     lambda w: w.reshape(15, 7), lambda x, w: x @ w),
    ("reshape_splits_out_axis", (6, 15), "io", (2, 6),
     lambda w: w.reshape(6, 3, 5), lambda x, w: jnp.einsum("bi,ihd->bhd", x, w)),
    ("reshape_with_ones", (6, 7), "io", (2, 6),
     lambda w: w.reshape(1, 6, 1, 7), lambda x, w: jnp.einsum("bi,sixo->bsxo", x, w)),
    ("expand_dims", (6, 7), "io", (2, 6), lambda w: jnp.expand_dims(w, 0),
     lambda x, w: jnp.einsum("bi,sio->bso", x, w)),
    ("expand_dims_middle", (6, 7), "io", (2, 6), lambda w: w[:, None],
     lambda x, w: jnp.einsum("bi,ixo->bxo", x, w)),
    ("squeeze", (1, 6, 7), "sio", (2, 6), lambda w: jnp.squeeze(w, 0),
     lambda x, w: x @ w),
    ("device_put", (6, 3, 5), "ioo", (2, 6), jax.device_put,
     lambda x, w: jnp.einsum("bi,ihd->bhd", x, w)),
)


class LayoutOpsTest(parameterized.TestCase):

  @parameterized.named_parameters(*_OPS)
  def test_stays_low_rank_and_matches_dense(self, shape, layout, x_shape, op, use):
    lora = _layout_lora(shape, layout)
    out = xrapture.use_implicit_args(op)(lora)
    outs = out if isinstance(out, list) else [out]
    expected = op(jnp.asarray(dense_value(lora), jnp.float32))
    expected = expected if isinstance(expected, list) else [expected]
    for got, want in zip(outs, expected):
      self.assertIsInstance(got, xrapture.LoraWeight)
      self.assertEqual(got.shape, want.shape)
      np.testing.assert_allclose(dense_value(got), want, rtol=1e-5, atol=1e-5)
    # Through a matmul: forward and gradients equal the dense reference and
    # no weight-sized product is formed, forward or backward.
    with warnings.catch_warnings():
      warnings.simplefilter("error", xrapture.MaterializationWarning)
      check(lambda x, w: use(x, op(w)), test_utils.rand(7, *x_shape), lora)

  def test_reshape_across_groups_materializes(self):
    lora = _layout_lora((6, 7), "io")
    out, messages = test_utils.materialization_messages(
        xrapture.use_implicit_args(lambda w: w.reshape(42)), lora)
    self.assertLen(messages, 1)
    self.assertIn("reshape", messages[0])
    np.testing.assert_allclose(out, dense_value(lora).reshape(42), rtol=1e-5)

  def test_concatenate_with_a_plain_array_materializes(self):
    # Folded into the frozen w, the plain array would lose its gradient.
    lora = _layout_lora((6, 7), "io")
    fn = xrapture.use_implicit_args(lambda w, v: jnp.concatenate([w, v], axis=1))
    out, messages = test_utils.materialization_messages(fn, lora, jnp.ones((6, 2)))
    self.assertLen(messages, 1)
    self.assertIn("concatenate", messages[0])
    self.assertEqual(out.shape, (6, 9))


if __name__ == "__main__":
  absltest.main()
