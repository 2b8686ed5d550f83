"""Tests for LoraWeight (xrapture/_src/lora/lora_weight.py)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import xrapture

import test_utils

M, N, R, L = 48, 40, 4, 5


def _lora(lead=(), a_lead=None, b_lead=None, **kwargs):
  a_lead = lead if a_lead is None else a_lead
  b_lead = lead if b_lead is None else b_lead
  return xrapture.LoraWeight(test_utils.rand(0, *lead, M, N), test_utils.rand(1, *a_lead, R, N),
                             test_utils.rand(2, *b_lead, M, R), **kwargs)


class LoraWeightTest(parameterized.TestCase):

  def test_constants(self):
    self.assertEqual(xrapture.LORA_FREEZE, 0)
    self.assertEqual(xrapture.LORA_FULL, -1)

  def test_properties(self):
    lora = _lora(lead=(L,), alpha=8.0)
    self.assertEqual(lora.shape, (L, M, N))
    self.assertEqual(lora.dtype, jnp.float32)
    self.assertEqual(lora.ndim, 3)
    self.assertEqual(lora.size, L * M * N)
    self.assertEqual(lora.rank, R)
    self.assertEqual(lora.aval, jax.ShapeDtypeStruct((L, M, N), jnp.float32))
    self.assertTrue(xrapture.is_implicit(lora))
    self.assertIsInstance(lora, xrapture.ImplicitArray)

  @parameterized.parameters((1.0, False, 1.0 / R), (8.0, False, 2.0),
                            (8.0, True, 8.0 / math.sqrt(R)))
  def test_scale(self, alpha, rslora, expected):
    self.assertAlmostEqual(_lora(alpha=alpha, rslora=rslora).get_scale(), expected)

  @parameterized.named_parameters(
      ("plain", (), None, None),
      ("stacked", (L,), None, None),
      ("a_broadcast", (3, 2), (1, 1), None),
      ("b_broadcast", (3, 2), None, (1, 1)),
      ("partly_broadcast", (L, 3), (1, 3), (L, 1)),
  )
  def test_materialize(self, lead, a_lead, b_lead):
    # 0.1.0's forms (size-1 leading axes broadcast) are rearranged into a
    # layout; the value is 0.1.0's broadcasting formula on the given factors.
    a_lead = lead if a_lead is None else a_lead
    b_lead = lead if b_lead is None else b_lead
    w, a, b = (np.asarray(test_utils.rand(i, *s), np.float64) for i, s in
               ((0, lead + (M, N)), (1, a_lead + (R, N)), (2, b_lead + (M, R))))
    lora = _lora(lead=lead, a_lead=a_lead, b_lead=b_lead, alpha=3.0)
    expected = w + 3.0 / R * np.einsum("...mr,...rn->...mn", b, a)
    out = lora.materialize()
    self.assertEqual(out.shape, lora.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_materialize_keeps_w_dtype(self):
    lora = xrapture.LoraWeight(test_utils.rand(0, M, N).astype(jnp.bfloat16),
                               test_utils.rand(1, R, N), test_utils.rand(2, M, R))
    self.assertEqual(lora.materialize().dtype, jnp.bfloat16)
    self.assertEqual(lora.dtype, jnp.bfloat16)

  def test_materialize_stops_w_gradient(self):
    lora = _lora()
    grads = jax.grad(lambda l: jnp.sum(jnp.sin(l.materialize())))(lora)
    np.testing.assert_array_equal(grads.w, np.zeros((M, N)))
    self.assertGreater(float(jnp.abs(grads.a).max()), 0.0)

  @parameterized.named_parameters(
      ("w_is_1d", (M,), (R, N), (M, R), "at least 2 dimensions"),
      ("ndim_mismatch", (M, N), (1, R, N), (M, R), "same number of dimensions"),
      ("wrong_m", (M, N), (R, N), (M + 1, R), "M"),
      ("wrong_n", (M, N), (R, N + 1), (M, R), "N"),
      ("wrong_rank", (M, N), (R + 1, N), (M, R), "rank"),
      ("bad_leading", (L, M, N), (2, R, N), (L, M, R), "leading axes"),
      ("factors_of_another_layout", (L, M, N), (R, M, N), (L, R), "same number"),
  )
  def test_bad_shapes(self, w_shape, a_shape, b_shape, problem):
    with self.assertRaises(ValueError) as ctx:
      xrapture.LoraWeight(jnp.zeros(w_shape), jnp.zeros(a_shape), jnp.zeros(b_shape))
    message = str(ctx.exception)
    for shape in (w_shape, a_shape, b_shape):
      self.assertIn(str(tuple(shape)), message)
    self.assertIn(problem, message)

  def test_abstract_leaves_are_validated(self):
    sds = jax.ShapeDtypeStruct
    xrapture.LoraWeight(sds((M, N), jnp.float32), sds((R, N), jnp.float32),
                        sds((M, R), jnp.float32))
    with self.assertRaisesRegex(ValueError, r"\(48, 40\).*\(4, 41\).*\(48, 4\)"):
      xrapture.LoraWeight(sds((M, N), jnp.float32), sds((R, N + 1), jnp.float32),
                          sds((M, R), jnp.float32))

  def test_replace_validates(self):
    lora = _lora()
    self.assertEqual(lora.replace(alpha=4.0).get_scale(), 1.0)
    with self.assertRaisesRegex(ValueError, "LoraWeight shapes disagree"):
      lora.replace(a=jnp.zeros((R, N + 1)))

  def test_pytree(self):
    lora = _lora(alpha=4.0, rslora=True)
    leaves, treedef = jax.tree.flatten(lora)
    self.assertLen(leaves, 3)
    np.testing.assert_array_equal(leaves[0], lora.w)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path({"k": lora})[0]]
    self.assertEqual(paths, ["['k'].w", "['k'].a", "['k'].b"])
    rebuilt = jax.tree.unflatten(treedef, leaves)
    self.assertEqual((rebuilt.alpha, rebuilt.rslora), (4.0, True))
    # alpha and rslora are static: they change the treedef, not the leaves.
    self.assertNotEqual(treedef, jax.tree.structure(lora.replace(alpha=2.0)))

  def test_tree_map_to_non_arrays(self):
    # Optimizer labels and masks rebuild a LoraWeight around non-arrays.
    labels = jax.tree.map(lambda _: "label", _lora())
    self.assertEqual((labels.w, labels.a, labels.b), ("label",) * 3)

  def test_passes_through_jit(self):
    lora = _lora(alpha=4.0)
    out = jax.jit(lambda l: l)(lora)
    self.assertIsInstance(out, xrapture.LoraWeight)
    self.assertEqual(out.alpha, 4.0)

  def test_outside_use_implicit_args_is_a_clear_error(self):
    with self.assertRaisesRegex(TypeError, "use_implicit_args"):
      jnp.ones((3, M)) @ _lora()


if __name__ == "__main__":
  absltest.main()


def _np_delta(layout, b, a, scale):
  """``scale · b @ a`` per stacked element, laid back into w's axes, by loops."""
  s = [d for d, c in enumerate(layout) if c == "s"]
  i = [d for d, c in enumerate(layout) if c == "i"]
  o = [d for d, c in enumerate(layout) if c == "o"]
  s_shape = b.shape[:len(s)]
  i_shape, o_shape = b.shape[len(s):-1], a.shape[len(s) + 1:]
  out = np.zeros(s_shape + i_shape + o_shape)
  for idx in np.ndindex(*s_shape):
    mat = b[idx].reshape(-1, b.shape[-1]) @ a[idx].reshape(a.shape[len(s)], -1)
    out[idx] = scale * mat.reshape(i_shape + o_shape)
  # out's axes are (s, i, o); put each back where the layout says.
  return np.transpose(out, np.argsort(s + i + o))


# Distinct sizes per axis, so any axis mix-up changes a shape.
_LAYOUTS = (
    # name, w shape, layout
    ("matrix", (6, 7), "io"),
    ("transposed_matrix", (6, 7), "oi"),
    ("attention_query", (6, 3, 5), "ioo"),       # [in, heads, head_dim]
    ("attention_output", (3, 5, 7), "iio"),      # [heads, head_dim, out]
    ("interleaved", (3, 5, 7, 2), "oiio"),
    ("experts", (4, 6, 7), "sio"),
    ("stacked_experts", (2, 4, 6, 7), "ssio"),
    ("stack_in_the_middle", (6, 4, 7), "iso"),
    ("conv2d_hwio", (3, 2, 5, 7), "iiio"),
    ("conv2d_hwoi", (3, 2, 7, 5), "iioi"),
)


class LayoutTest(parameterized.TestCase):

  @parameterized.named_parameters(*_LAYOUTS)
  def test_materialize_against_loops(self, shape, layout):
    r = 2
    stack = [shape[d] for d, c in enumerate(layout) if c == "s"]
    ins = [shape[d] for d, c in enumerate(layout) if c == "i"]
    outs = [shape[d] for d, c in enumerate(layout) if c == "o"]
    w = test_utils.rand(0, *shape)
    a = test_utils.rand(1, *stack, r, *outs)
    b = test_utils.rand(2, *stack, *ins, r)
    lora = xrapture.LoraWeight(w, a, b, alpha=3.0, layout=layout)
    self.assertEqual(lora.layout, layout)
    self.assertEqual(lora.rank, r)
    self.assertEqual(lora.grouped_shape, (int(np.prod(ins)), int(np.prod(outs))))
    expected = np.asarray(w, np.float64) + _np_delta(
        layout, np.asarray(b, np.float64), np.asarray(a, np.float64), 3.0 / r)
    np.testing.assert_allclose(lora.materialize(), expected, rtol=1e-5, atol=1e-5)
    # The update has rank <= r as a grouped matrix, per stacked element.
    delta = expected - np.asarray(w, np.float64)
    perm = ([d for d, c in enumerate(layout) if c == "s"]
            + [d for d, c in enumerate(layout) if c == "i"]
            + [d for d, c in enumerate(layout) if c == "o"])
    grouped = np.transpose(delta, perm).reshape(
        (-1, int(np.prod(ins)), int(np.prod(outs))))
    for mat in grouped:
      self.assertLessEqual(np.linalg.matrix_rank(mat), r)

  @parameterized.named_parameters(
      ("wrong_b", (6, 3, 5), "ioo", (2, 3, 5), (5, 2), "b (6, 2)"),
      ("wrong_a", (6, 3, 5), "ioo", (2, 15), (6, 2), "a (2, 3, 5)"),
      ("rank_disagrees", (6, 7), "io", (3, 7), (6, 2), "a (2, 7)"),
      ("no_out_axis", (6, 7), "ii", (2,), (6, 7, 2), "at least one 'i' and one 'o'"),
      ("bad_char", (6, 7), "ix", (2, 7), (6, 2), "characters from 's', 'i', 'o'"),
      ("wrong_length", (6, 7), "sio", (2, 7), (6, 2), "2 characters"),
  )
  def test_bad_layout_names_expected_shapes(self, w_shape, layout, a_shape, b_shape,
                                            problem):
    with self.assertRaises(ValueError) as ctx:
      xrapture.LoraWeight(jnp.zeros(w_shape), jnp.zeros(a_shape), jnp.zeros(b_shape),
                          layout=layout)
    message = str(ctx.exception)
    self.assertIn(problem, message)
    self.assertIn(str(tuple(w_shape)), message)

  @parameterized.named_parameters(
      # 0.1.0's conv form: b spans the window, a pointwise -> window joins 'i'.
      ("conv_b_spans_window", (3, 2, M, N), (1, 1, R, N), (3, 2, M, R), "iiio",
       (R, N), (3, 2, M, R)),
      # a spans the window, b pointwise -> the window joins 'o'.
      ("conv_a_spans_window", (3, M, N), (3, R, N), (1, M, R), "oio",
       (R, 3, N), (M, R)),
      ("stacked", (L, M, N), (L, R, N), (L, M, R), "sio", (L, R, N), (L, M, R)),
      ("mixed", (L, 3, M, N), (1, 3, R, N), (L, 1, M, R), "ioio",
       (R, 3, N), (L, M, R)),
  )
  def test_v010_forms_are_rearranged(self, w_shape, a_shape, b_shape, layout,
                                     new_a, new_b):
    lora = xrapture.LoraWeight(test_utils.rand(0, *w_shape), test_utils.rand(1, *a_shape),
                               test_utils.rand(2, *b_shape))
    self.assertEqual(lora.layout, layout)
    self.assertEqual((lora.a.shape, lora.b.shape), (new_a, new_b))
    # The same LoraWeight written in the new form is equal.
    again = xrapture.LoraWeight(lora.w, lora.a, lora.b, layout=layout)
    np.testing.assert_array_equal(again.materialize(), lora.materialize())

  def test_layout_is_static(self):
    lora = xrapture.LoraWeight(test_utils.rand(0, 6, 3, 5), test_utils.rand(1, 2, 3, 5),
                               test_utils.rand(2, 6, 2),
                               layout="ioo")
    leaves, treedef = jax.tree.flatten(lora)
    self.assertLen(leaves, 3)
    self.assertEqual(jax.tree.unflatten(treedef, leaves).layout, "ioo")
    self.assertNotEqual(treedef, jax.tree.structure(xrapture.LoraWeight(
        test_utils.rand(0, 6, 15), test_utils.rand(1, 2, 15), test_utils.rand(2, 6, 2))))

  def test_vmap_over_a_stack_drops_the_stacked_axis(self):
    lora = _lora(lead=(L,), alpha=2.0)
    dense = jax.vmap(lambda l: l.materialize())(lora)
    np.testing.assert_allclose(dense, lora.materialize(), rtol=1e-6)
