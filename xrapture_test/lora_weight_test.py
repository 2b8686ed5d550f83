"""Tests for LoraWeight (xrapture/_src/lora/lora_weight.py)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import xrapture

M, N, R, L = 48, 40, 4, 5


def _rand(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _lora(lead=(), a_lead=None, b_lead=None, **kwargs):
  a_lead = lead if a_lead is None else a_lead
  b_lead = lead if b_lead is None else b_lead
  return xrapture.LoraWeight(_rand(0, *lead, M, N), _rand(1, *a_lead, R, N),
                             _rand(2, *b_lead, M, R), **kwargs)


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
    lora = _lora(lead=lead, a_lead=a_lead, b_lead=b_lead, alpha=3.0)
    w, a, b = (np.asarray(x, np.float64) for x in (lora.w, lora.a, lora.b))
    expected = w + 3.0 / R * np.einsum("...mr,...rn->...mn", b, a)
    out = lora.materialize()
    self.assertEqual(out.shape, lora.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_materialize_keeps_w_dtype(self):
    lora = xrapture.LoraWeight(_rand(0, M, N).astype(jnp.bfloat16),
                               _rand(1, R, N), _rand(2, M, R))
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
